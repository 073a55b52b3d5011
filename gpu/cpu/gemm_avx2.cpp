// AVX2 kernel: a 16-column panel is two ymm halves; each lane is one fma chain per
// (row, column), exactly as in the AVX-512 and scalar kernels. 16-bit weights are widened
// per half: bf16 by a zero-extend and a 16-bit shift, f16 by F16C's vcvtph2ps; both exact.
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

  // Eight weights as f32, from a 32-byte (f32) or 16-byte (16-bit) aligned address.
  template <class welem>
  static __m256 load_half(const welem* w) {
    if constexpr (std::is_same_v<welem, float>) {
      return _mm256_load_ps(w);
    } else {
      const __m128i bits = _mm_load_si128(reinterpret_cast<const __m128i*>(w));
      if constexpr (std::is_same_v<welem, bf16_bits>)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
      else
        return _mm256_cvtph_ps(bits);
    }
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
    }
    const float* x = t.x;
    const welem* w = static_cast<const welem*>(t.w);
    for (std::size_t k = 0; k < t.k_count; ++k, ++x, w += pw) {
      __m256 b[halves];
#pragma GCC unroll 4
      for (std::size_t h = 0; h < halves; ++h)
        b[h] = load_half(w + (h / 2) * t.panel_stride + (h % 2) * 8);
#pragma GCC unroll 8
      for (std::size_t i = 0; i < rows; ++i) {
        const __m256 a = _mm256_broadcast_ss(x + i * t.x_stride);
#pragma GCC unroll 4
        for (std::size_t h = 0; h < halves; ++h)
          acc[i][h] = _mm256_fmadd_ps(a, b[h], acc[i][h]);
      }
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
