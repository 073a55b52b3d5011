// AVX-512 kernel: 16-float zmm lanes match the 16-column panels, so one aligned load
// fetches a panel's k-th row and every fma keeps one chain per (row, column) lane. A row of
// 16-bit weights is one 32-byte load widened to 16 floats: bf16 by a zero-extend and a
// 16-bit shift (its bits are the top half of the f32), f16 by vcvtph2ps; both exact.
#include "gpu/cpu/gemm_kernels.hpp"

#include <immintrin.h>

#include <type_traits>

// GCC 12's AVX-512 intrinsics seed their pass-through operand with a self-initialised
// _mm512_undefined_*(), which -Wmaybe-uninitialized reports at every inlined use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace moert::cpu {

namespace {

struct avx512 {
  // Of 32 zmm: 8 rows × 3 panels = 24 accumulators + 3 weight vectors + 1 broadcast;
  // up to 6 rows take 4 panels, so decode still has 4 independent chains per row.
  static constexpr std::size_t max_rows = 8;
  static constexpr std::size_t max_panels = 4;
  static constexpr std::size_t panels_for(std::size_t rows) { return rows > 6 ? 3 : 4; }
  // Few rows are bound by streaming the weights once, so blocking K only adds y traffic.
  static constexpr std::size_t k_block(std::size_t rows) { return rows <= 8 ? ~std::size_t{0} : 1024; }

  // One panel row (16 weights) as f32, from a 64-byte (f32) or 32-byte (16-bit) aligned address.
  template <class welem>
  static __m512 load_row(const welem* w) {
    if constexpr (std::is_same_v<welem, float>) {
      return _mm512_load_ps(w);
    } else {
      const __m256i bits = _mm256_load_si256(reinterpret_cast<const __m256i*>(w));
      if constexpr (std::is_same_v<welem, bf16_bits>)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
      else
        return _mm512_cvtph_ps(bits);
    }
  }

  template <std::size_t rows, std::size_t panels, class welem>
  static void tile(const gemm_tile& t) {
    constexpr std::size_t pw = packed_matrix::panel_width;
    __mmask16 mask[panels];
#pragma GCC unroll 4
    for (std::size_t j = 0; j < panels; ++j)
      mask[j] = j + 1 < panels ? __mmask16(0xffff) : __mmask16((1u << t.last_cols) - 1);
    __m512 acc[rows][panels];
#pragma GCC unroll 8
    for (std::size_t i = 0; i < rows; ++i)
#pragma GCC unroll 4
      for (std::size_t j = 0; j < panels; ++j)
        acc[i][j] = _mm512_setzero_ps();
    if (t.resume) {
#pragma GCC unroll 8
      for (std::size_t i = 0; i < rows; ++i)
#pragma GCC unroll 4
        for (std::size_t j = 0; j < panels; ++j)
          acc[i][j] = _mm512_maskz_loadu_ps(mask[j], t.y + i * t.y_stride + j * pw);
    }
    const float* x = t.x;
    const welem* w = static_cast<const welem*>(t.w);
    for (std::size_t k = 0; k < t.k_count; ++k, ++x, w += pw) {
      __m512 b[panels];
#pragma GCC unroll 4
      for (std::size_t j = 0; j < panels; ++j)
        b[j] = load_row(w + j * t.panel_stride);
#pragma GCC unroll 8
      for (std::size_t i = 0; i < rows; ++i) {
        const __m512 a = _mm512_set1_ps(x[i * t.x_stride]);
#pragma GCC unroll 4
        for (std::size_t j = 0; j < panels; ++j)
          acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
      }
    }
#pragma GCC unroll 8
    for (std::size_t i = 0; i < rows; ++i)
#pragma GCC unroll 4
      for (std::size_t j = 0; j < panels; ++j)
        _mm512_mask_storeu_ps(t.y + i * t.y_stride + j * pw, mask[j], acc[i][j]);
  }
};

}  // namespace

void matmul_panels_avx512(const gemm_args& a, std::size_t panel_begin, std::size_t panel_end) {
  run_panel_tiles_typed<avx512>(a, panel_begin, panel_end);
}

}  // namespace moert::cpu
