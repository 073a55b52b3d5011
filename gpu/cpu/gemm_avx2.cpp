// AVX2 kernel: a 16-column panel is two ymm halves; each lane is one fma chain per
// (row, column), exactly as in the AVX-512 and scalar kernels. 16-bit weights are widened
// exactly: f16 per half by F16C's vcvtph2ps; bf16 a whole panel row at a time, one 32-byte
// load interleaved with zeros (vpunpck{l,h}wd puts each bf16 in the top half of an f32). The
// unpacks work within 128-bit lanes, so a bf16 tile's two accumulators per panel hold columns
// {0-3, 8-11} and {4-7, 12-15}; they are put back in order only when y is read or written,
// which moves lanes, not the chains in them.
#include "gpu/cpu/gemm_kernels.hpp"

#include <immintrin.h>

#include <type_traits>

namespace moert::cpu {

namespace {

struct avx2 {
  // 16 ymm: 6 rows × 1 panel (12 accumulators) + 2 weight halves + 1 broadcast, or for
  // up to 3 rows 2 panels, which keeps ≥ 4 chains in flight per row for decode.
  static constexpr std::size_t max_rows = 6;
  static constexpr std::size_t max_panels = 2;
  static constexpr std::size_t panels_for(std::size_t rows) { return rows <= 3 ? 2 : 1; }
  static constexpr std::size_t k_block(std::size_t rows) { return rows <= 8 ? ~std::size_t{0} : 1024; }

  // Eight f32 or f16 weights as f32, from a 32-byte (f32) or 16-byte (f16) aligned address.
  template <class welem>
  static __m256 load_half(const welem* w) {
    if constexpr (std::is_same_v<welem, float>)
      return _mm256_load_ps(w);
    else
      return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(w)));
  }

  template <std::size_t rows, std::size_t panels, class welem>
  static void tile(const gemm_tile& t) {
    constexpr std::size_t pw = packed_matrix::panel_width, halves = 2 * panels;
    // Lane masks for the last panel's two halves, by sign bit as maskload/maskstore want.
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int cols = int(t.last_cols);
    const __m256i tail[2] = {_mm256_cmpgt_epi32(_mm256_set1_epi32(cols), lane),
                             _mm256_cmpgt_epi32(_mm256_set1_epi32(cols - 8), lane)};
    const bool full = t.last_cols == pw;
    float* const y = t.y;
    constexpr bool swizzled = std::is_same_v<welem, bf16_bits>;
    // In-order halves (columns 0-7, 8-15) <-> the bf16 lane order, and back: the same swap.
    auto swizzle = [](__m256& lo, __m256& hi) {
      const __m256 a = _mm256_permute2f128_ps(lo, hi, 0x20), b = _mm256_permute2f128_ps(lo, hi, 0x31);
      lo = a;
      hi = b;
    };
    __m256 acc[rows][halves];
#pragma GCC unroll 8
    for (std::size_t i = 0; i < rows; ++i)
#pragma GCC unroll 4
      for (std::size_t h = 0; h < halves; ++h)
        acc[i][h] = _mm256_setzero_ps();
    if (t.resume) {
#pragma GCC unroll 8
      for (std::size_t i = 0; i < rows; ++i)
#pragma GCC unroll 4
        for (std::size_t h = 0; h < halves; ++h) {
          const float* src = y + i * t.y_stride + h * 8;
          acc[i][h] = h < halves - 2 || full ? _mm256_loadu_ps(src)
                                             : _mm256_maskload_ps(src, tail[h % 2]);
        }
      if constexpr (swizzled) {
#pragma GCC unroll 8
        for (std::size_t i = 0; i < rows; ++i)
#pragma GCC unroll 4
          for (std::size_t j = 0; j < panels; ++j)
            swizzle(acc[i][2 * j], acc[i][2 * j + 1]);
      }
    }
    const float* x = t.x;
    const welem* w = static_cast<const welem*>(t.w);
    const welem* pf = static_cast<const welem*>(t.prefetch);
    std::size_t next_pf = pf != nullptr ? t.prefetch_phase : ~std::size_t{0};
    for (std::size_t k = 0; k < t.k_count; ++k, ++x, w += pw) {
      if (k == next_pf) {
        for (std::size_t j = 0; j < t.prefetch_panels; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(pf + j * t.panel_stride + k * pw), _MM_HINT_T1);
        next_pf += t.prefetch_every;
      }
      __m256 b[halves];
      if constexpr (swizzled) {
        const __m256i zero = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (std::size_t j = 0; j < panels; ++j) {
          const __m256i bits = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + j * t.panel_stride));
          b[2 * j] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, bits));
          b[2 * j + 1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, bits));
        }
      } else {
#pragma GCC unroll 4
        for (std::size_t h = 0; h < halves; ++h)
          b[h] = load_half(w + (h / 2) * t.panel_stride + (h % 2) * 8);
      }
#pragma GCC unroll 8
      for (std::size_t i = 0; i < rows; ++i) {
        const __m256 a = _mm256_broadcast_ss(x + i * t.x_stride);
#pragma GCC unroll 4
        for (std::size_t h = 0; h < halves; ++h)
          acc[i][h] = _mm256_fmadd_ps(a, b[h], acc[i][h]);
      }
    }
    if constexpr (swizzled) {
#pragma GCC unroll 8
      for (std::size_t i = 0; i < rows; ++i)
#pragma GCC unroll 4
        for (std::size_t j = 0; j < panels; ++j)
          swizzle(acc[i][2 * j], acc[i][2 * j + 1]);
    }
#pragma GCC unroll 8
    for (std::size_t i = 0; i < rows; ++i)
#pragma GCC unroll 4
      for (std::size_t h = 0; h < halves; ++h) {
        float* dst = y + i * t.y_stride + h * 8;
        if (h < halves - 2 || full)
          _mm256_storeu_ps(dst, acc[i][h]);
        else
          _mm256_maskstore_ps(dst, tail[h % 2], acc[i][h]);
      }
  }
};

}  // namespace

void matmul_panels_avx2(const gemm_args& a, std::size_t panel_begin, std::size_t panel_end) {
  run_panel_tiles_typed<avx2>(a, panel_begin, panel_end);
}

}  // namespace moert::cpu
