#pragma once

// Batch-invariant f32 matrix multiply for nn.Linear-shaped weights.
//
// Every output element y[m][n] is one sequential chain of fused multiply-adds over
// k = 0, 1, …, K-1 starting from +0.0f, whatever M, the tile it falls in, the instruction
// set (AVX-512, AVX2 or scalar fallback) or the thread count. A token's output bits
// therefore never depend on which other tokens share its batch (DESIGN.md §4).
//
// Units: element counts; all matrices row-major f32.
// Thread safety: a packed_matrix is immutable after pack() and may be shared by threads.

#include <cstddef>
#include <memory>

namespace moert::cpu {

class thread_pool;

// A weight W[N][K] (out_features × in_features, the nn.Linear layout) repacked into
// column panels of `panel_width` outputs: panel p holds W[p*16 .. p*16+15][0..K-1]
// transposed to k-major order, zero-padded past N. 64-byte aligned.
class packed_matrix {
public:
  static constexpr std::size_t panel_width = 16;

  packed_matrix() = default;

  // Copies `w` (n rows of k floats) into the packed layout.
  static packed_matrix pack(const float* w, std::size_t n, std::size_t k);

  std::size_t rows() const { return rows_; }  // N, output features
  std::size_t cols() const { return cols_; }  // K, input features
  std::size_t num_panels() const { return (rows_ + panel_width - 1) / panel_width; }
  // Panel p: cols() rows of panel_width floats.
  const float* panel(std::size_t p) const { return data_.get() + p * cols_ * panel_width; }
  // W[n][k], for tests and slow paths.
  float at(std::size_t n, std::size_t k) const;
  // Bytes held.
  std::size_t num_bytes() const { return num_panels() * cols_ * panel_width * sizeof(float); }

private:
  struct aligned_free {
    void operator()(float* p) const;
  };
  std::unique_ptr<float[], aligned_free> data_;
  std::size_t rows_ = 0;
  std::size_t cols_ = 0;
};

// y[m][n] = Σ_k x[m][k] · w[n][k] for m < num_rows, n < w.rows().
// x has w.cols() floats per row, y has w.rows() floats per row; they must not alias.
// `pool` may be null (single thread). Work is split over column panels.
void matmul(const float* x, std::size_t num_rows, const packed_matrix& w, float* y,
            thread_pool* pool);

// Name of the kernel matmul() dispatches to on this CPU ("avx512", "avx2", "scalar").
const char* matmul_kernel_name();

}  // namespace moert::cpu
