#pragma once

// GEMM for nn.Linear-shaped weights on the GPU, through cuBLAS: y[m][n] = Σ_k x[m][k]·w[n][k],
// f32 activations and outputs, weights resident on the device as f32, bf16 or f16.
//
// - f32 weights: cublasGemmEx with CUBLAS_COMPUTE_32F (no TF32), so results agree with the
//   CPU backend to ~1e-6 relative.
// - bf16 / f16 weights: activations rounded to the weight type on the device, cuBLAS
//   multiplies in tensor cores with f32 accumulation and writes f32 (agreement ~1e-2).
//
// Expert GEMMs on one device (EPS-MoE, ../shared/reference/amoe-eps.md §3.5): a batch of
// experts each with its own rows runs either as one grouped GEMM across the experts
// (cublasGemmGroupedBatchedEx: one launch, good for few rows per expert) or as one dense GEMM
// per expert (better once an expert has many rows). gemm_switch decides per expert by its row
// count against a threshold that comes from calibration (time_expert_gemms + fit_gemm_switch,
// or cuda_backend::calibrate_gemm_switch; driven by `moert calibrate --backend cuda`); the
// uncalibrated default is marked as such.
//
// Thread safety: every call issues work on the context's stream and returns without waiting;
// one thread per context.

#include "core/dtype.hpp"
#include "core/error.hpp"
#include "gpu/cuda/device.hpp"

#include <cstddef>
#include <span>
#include <string>
#include <vector>

namespace moert::cpu {
class packed_matrix;
}

namespace moert::cuda {

// A weight W[N][K] row-major on one device, in its stored type.
struct device_matrix {
  device_buffer data;
  dtype type = dtype::f32;
  std::size_t rows = 0;  // N, output features
  std::size_t cols = 0;  // K, input features
  std::size_t num_bytes() const { return rows * cols * size_of(type); }
};

// Copies a row-major host matrix (n rows of k elements of `type`) to the context's device.
result<device_matrix> upload_matrix(context& ctx, dtype type, const void* host, std::size_t n, std::size_t k);
// Copies a CPU-backend packed matrix (gpu/cpu/gemm.hpp) to the device as row-major, keeping
// its type (f32, bf16 or f16). Waits for the copy.
result<device_matrix> upload_packed(context& ctx, const cpu::packed_matrix& w);

// y (num_rows × w.rows, device) = x (num_rows × w.cols, device) · wᵀ. x and y must not alias.
// GEMM calls use the context's scratch slots 0 and 1 (16-bit copies of activations and
// outputs); callers keep their own live buffers in slots 3 and up.
status matmul(context& ctx, const float* x, std::size_t num_rows, const device_matrix& w, float* y);

// -- expert GEMMs and the grouped/dense switch ---------------------------------------------------

// One expert's GEMM in a batch: y (rows × w->rows) = x (rows × w->cols) · wᵀ, device memory.
struct expert_gemm {
  const device_matrix* w;
  const float* x;
  float* y;
  std::size_t rows;
};

enum class gemm_kind { grouped, dense };

// Experts with at least `dense_min_rows` rows run as dense GEMMs; the others as one grouped
// GEMM. `calibrated` says whether the threshold was measured on this GPU and shape; `source`
// says where it came from ("calibrated on NVIDIA H200 …" or the default's provenance).
struct gemm_switch {
  std::size_t dense_min_rows = 0;
  bool calibrated = false;
  std::string source;

  gemm_kind choose(std::size_t rows) const { return rows >= dense_min_rows ? gemm_kind::dense : gemm_kind::grouped; }

  // Uncalibrated default: 2048 rows, EPS-MoE's lower threshold for DeepSeek-V2 on H800
  // (amoe-eps.md §3.5), to be replaced by calibrate_gemm_switch on the actual GPU and shape.
  static gemm_switch uncalibrated_default();
  // Always grouped / always dense (tests and the benchmark's fixed paths).
  static gemm_switch always(gemm_kind kind);
};

// How a run_expert_gemms call split its experts.
struct expert_gemm_stats {
  std::size_t grouped_experts = 0;
  std::size_t dense_experts = 0;
};

// Runs every GEMM of `batch` (all weights of one shape and type, rows may differ; zero-row
// entries are skipped), grouped or dense per `sw`.
status run_expert_gemms(context& ctx, std::span<const expert_gemm> batch, const gemm_switch& sw,
                        expert_gemm_stats* stats = nullptr);

// -- calibration -------------------------------------------------------------------------------

// The shape of one expert GEMM: an expert's gate_up (n = 2·intermediate, k = hidden) or down
// (n = hidden, k = intermediate) projection, for num_experts experts of one device.
struct expert_gemm_shape {
  std::size_t n = 0;
  std::size_t k = 0;
  dtype type = dtype::bf16;
  std::size_t num_experts = 8;
};

// One point of the sweep: every expert has `rows` rows. Times are medians over the reps,
// in milliseconds, for all experts together; spread = (max - min) / median of the dense and
// grouped runs. dense_peak: one dense GEMM of num_experts·rows rows against one weight, the
// cuBLAS ceiling the expert path is compared against.
struct gemm_timing {
  std::size_t rows = 0;
  double grouped_ms = 0.0;
  double dense_ms = 0.0;
  double dense_peak_ms = 0.0;
  double grouped_spread = 0.0;
  double dense_spread = 0.0;
  // 2·rows·n·k·num_experts floating-point operations over `ms`, in TFLOP/s.
  static double tflops(const expert_gemm_shape& s, std::size_t rows, double ms);
};

// Times grouped, dense and dense-peak GEMMs on random weights of `shape` for each row count
// in `rows_grid` (ascending), `reps` times each after a warm-up, with CUDA events on the
// context's stream. Blocks until done (a calibration or bench step, never on the data path).
result<std::vector<gemm_timing>> time_expert_gemms(context& ctx, const expert_gemm_shape& shape,
                                                   std::span<const std::size_t> rows_grid, int reps);

// The switch a sweep implies: the smallest grid row count from which dense is no slower than
// grouped at that and every larger grid point (one crossover, so a noisy point below it does
// not flip the choice back). Dense never wins at the largest grid point: SIZE_MAX (always
// grouped); dense always wins: the grid's first row count. Pure, needs no GPU; `source`
// describes the calibration. An empty or unsorted sweep is an error.
result<gemm_switch> fit_gemm_switch(std::span<const gemm_timing> sweep, std::string source);

}  // namespace moert::cuda
