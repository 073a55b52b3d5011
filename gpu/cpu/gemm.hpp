#pragma once

// Batch-invariant matrix multiply for nn.Linear-shaped weights: f32 activations and outputs,
// weights held as f32, bf16 or f16.
//
// Every output element y[m][n] is one sequential chain of fused multiply-adds over
// k = 0, 1, …, K-1 starting from +0.0f, whatever M, the tile it falls in, the instruction
// set (AVX-512, AVX2 or scalar fallback) or the thread count. A token's output bits
// therefore never depend on which other tokens share its batch (DESIGN.md §4).
//
// 16-bit weights are widened to f32 in registers right before their fma. Widening is exact
// (every bf16 and f16 value is an f32), so a bf16 or f16 matrix gives the same bits as its
// f32 upcast while streaming half the bytes (NaN payloads aside: F16C quiets signalling NaNs).
//
// Units: element counts; activations and outputs row-major f32.
// Thread safety: a packed_matrix is immutable after pack() and may be shared by threads.

#include "core/dtype.hpp"

#include <cstddef>
#include <memory>
#include <span>

namespace moert::cpu {

class thread_pool;

// Where pack() reads some rows of a weight: element (r, c) of this part is at
// data + (r * row_stride + c * col_stride) elements of `type`, little-endian, any alignment.
// col_stride 1 is a row-major slice; row_stride 1 reads a transposed matrix.
struct matrix_part {
  const void* data;
  dtype type;
  std::size_t rows;
  std::size_t row_stride;
  std::size_t col_stride = 1;
};

// A weight W[N][K] (out_features × in_features, the nn.Linear layout) repacked into
// column panels of `panel_width` outputs: panel p holds W[p*16 .. p*16+15][0..K-1]
// transposed to k-major order, zero-padded past N, as elements of type(). 64-byte aligned, in
// 2 MiB-aligned chunks, huge pages on request (weight_memory.hpp). Copies share the same immutable panels.
class packed_matrix {
public:
  static constexpr std::size_t panel_width = 16;

  packed_matrix() = default;

  // Copies `w` (n rows of k floats) into the packed layout, as f32.
  static packed_matrix pack(const float* w, std::size_t n, std::size_t k);
  // Copies `w` (n rows of k elements of `type`, any alignment) keeping its type.
  static packed_matrix pack(dtype type, const void* w, std::size_t n, std::size_t k);
  // Rows of `parts` one after another (N = the sum of their rows), k columns each, stored
  // as `type`. Each part's type must be `type`, or `type` must be f32 (an exact upcast).
  static packed_matrix pack(dtype type, std::size_t k, std::span<const matrix_part> parts);

  dtype type() const { return type_; }
  std::size_t rows() const { return rows_; }  // N, output features
  std::size_t cols() const { return cols_; }  // K, input features
  std::size_t num_panels() const { return (rows_ + panel_width - 1) / panel_width; }
  // Panel p: cols() rows of panel_width elements of type().
  const void* panel(std::size_t p) const {
    return data_.get() + p * cols_ * panel_width * size_of(type_);
  }
  // W[n][k] as f32, for tests and slow paths.
  float at(std::size_t n, std::size_t k) const;
  // Bytes held.
  std::size_t num_bytes() const { return num_panels() * cols_ * panel_width * size_of(type_); }

private:
  std::shared_ptr<std::byte> data_;
  dtype type_ = dtype::f32;
  std::size_t rows_ = 0;
  std::size_t cols_ = 0;
};

// y[m][n] = Σ_k x[m][k] · w[n][k] for m < num_rows, n < w.rows().
// x has w.cols() floats per row, y has w.rows() floats per row; they must not alias.
// `pool` may be null (single thread). Work is split over column panels.
void matmul(const float* x, std::size_t num_rows, const packed_matrix& w, float* y,
            thread_pool* pool);

// One entry of matmul_batch: y = x · wᵀ as matmul, num_rows rows.
struct matmul_entry {
  const packed_matrix* w;
  const float* x;
  std::size_t num_rows;
  float* y;
};

// matmul() of every entry (outputs disjoint, no output aliasing an input), as one
// parallel_for over all their panels: the bits of matmul() per entry, one pool barrier for
// all (a device's experts of one step are a few rows each, so per-entry barriers dominate).
void matmul_batch(std::span<const matmul_entry> batch, thread_pool* pool);

// The work matmul() weighs against min_parallel_work (thread_pool.hpp), in multiply-adds:
// the product's own plus the cost of streaming the weights, which dominates at decode's few
// rows (a 1024 × 1024 f32 weight is 4 MiB, ~0.3 ms from DRAM on one core, yet only 1 M
// multiply-adds for one row).
std::size_t matmul_work(std::size_t num_rows, std::size_t n, std::size_t k);

// Name of the kernel matmul() dispatches to on this CPU ("avx512", "avx2", "scalar").
const char* matmul_kernel_name();

}  // namespace moert::cpu
