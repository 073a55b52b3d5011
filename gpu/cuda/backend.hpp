#pragma once

// The CUDA backend: gpu::backend (gpu/backend.hpp) on one GPU. Memory is device memory
// (cudaMalloc), matrices are row-major device copies in the checkpoint's type (f32, bf16 or
// f16) multiplied through cuBLAS, operations are enqueued on the backend's one stream (one
// stream per device executor) and return at once; when_done() calls back from CUDA's host
// callback thread when the stream reaches it.
//
// Memory comes from the device's stream-ordered pool (cudaMallocAsync on the backend's
// stream, its release threshold raised so freed blocks stay cached): the layer steps allocate
// scratch per call, and a free is queued behind the work already issued instead of stalling
// the device as cudaFree would. A buffer used by another backend of the same device must be
// synchronized there before it is released.
//
// Per-call host parameters (`*_host`: positions, row pointers, routing weights, RoPE angles)
// are copied into a ring of pinned staging slots and from there onto the device, in stream
// order, so the caller's arrays may die when a call returns. upload() stages small copies the
// same way and waits for large ones; route() returns its slots on the host and therefore
// waits for the stream, as download() does.
//
// Errors: the seam's operations return nothing, so the first CUDA or cuBLAS failure is kept
// (error()), printed once to stderr, and later operations are skipped until the backend is
// destroyed; allocate() throws std::bad_alloc as the seam says.
//
// Beyond the seam: expert_matmuls() runs a device's expert GEMMs grouped or dense by load
// (gemm.hpp, EPS-MoE), with the switch set from calibration (set_gemm_switch).
//
// Thread safety: as gpu::backend; memory functions from any thread (they make the device
// current), operations from the owning executor thread only.

#include "gpu/backend.hpp"
#include "gpu/registry.hpp"
#include "gpu/cuda/device.hpp"
#include "gpu/cuda/gemm.hpp"

#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace moert::cuda {

// One matrix as the cuda backend holds it.
class cuda_matrix final : public gpu::matrix_storage {
public:
  explicit cuda_matrix(device_matrix m)
      : gpu::matrix_storage(gpu::backend_kind::cuda, m.type, m.rows, m.cols, m.num_bytes()), m_(std::move(m)) {}
  const device_matrix& device_copy() const { return m_; }

private:
  device_matrix m_;
};

// The device matrix behind a cuda-backend handle (aborts for another backend's handle: a
// programming error).
const device_matrix& device_matrix_of(const gpu::matrix& m);

// One expert GEMM of expert_matmuls(): y (rows × w->rows()) = x (rows × w->cols()) · wᵀ.
struct expert_matmul {
  const gpu::matrix* w;
  const float* x;
  float* y;
  std::size_t rows;
};

class cuda_backend final : public gpu::backend {
public:
  // A backend on visible GPU `device_idx`; an error (device_error) when CUDA has no such
  // device, e.g. "no CUDA device: cudaGetDeviceCount: CUDA driver version is insufficient …".
  static result<std::unique_ptr<cuda_backend>> create(int device_idx);
  ~cuda_backend() override;

  gpu::backend_kind kind() const override { return gpu::backend_kind::cuda; }
  std::string name() const override { return name_; }
  bool shares_memory_with(const gpu::backend& other) const override;

  gpu::buffer allocate(std::size_t num_bytes) override;
  void upload(void* dst, const void* src_host, std::size_t num_bytes) override;
  void download(void* dst_host, const void* src, std::size_t num_bytes) override;
  void copy(void* dst, const void* src, std::size_t num_bytes) override;
  result<gpu::matrix> upload_matrix(dtype type, std::size_t cols, std::span<const gpu::matrix_part> parts) override;

  void matmul(const float* x, std::size_t num_rows, const gpu::matrix& w, float* y, const float* bias) override;
  void rms_norm(const float* x, std::size_t num_rows, std::size_t dim, std::size_t row_stride,
                const float* weight, float eps, float* out) override;
  void rope(float* x, std::size_t num_rows, std::size_t row_stride, std::size_t num_heads, std::size_t head_stride,
            std::size_t dim, gpu::rope_style style, const float* table_host,
            const std::size_t* positions_host) override;
  void attention(const float* q, std::span<const gpu::kv_rows> rows_host, const gpu::attention_shape& shape,
                 float* out) override;
  void mla_attention(const float* q, std::span<const gpu::kv_rows> rows_host, const gpu::mla_shape& shape,
                     float* out) override;
  void route(float* logits, std::size_t num_rows, const gpu::route_params& p,
             gpu::routed_slot* routes_host) override;
  void swiglu(const float* gate_up, std::size_t num_rows, std::size_t dim, float* out) override;
  void sigmoid_gate(const float* gate, std::size_t num_rows, std::size_t dim, float* x) override;
  void add(float* x, const float* y, std::size_t count) override;
  void gather_rows(const float* const* src_rows_host, std::size_t num_rows, std::size_t dim, float* dst) override;
  void scatter_rows(const float* src, std::size_t src_stride, std::size_t num_rows, std::size_t dim,
                    float* const* dst_rows_host) override;
  void copy_rows(const float* src, std::size_t src_stride, float* dst, std::size_t dst_stride, std::size_t num_rows,
                 std::size_t dim) override;
  void weight_rows(const float* x, std::size_t num_rows, std::size_t dim, const float* weights_host,
                   float* const* out_rows_host) override;
  void combine(const float* const* weighted_host, std::size_t top_k, const float* side, std::size_t num_rows,
               std::size_t dim, float* x) override;

  // One stream: every range runs on this backend, in order.
  void concurrent(std::size_t num_tasks, std::size_t work,
                  const std::function<void(gpu::backend& lane, std::size_t begin, std::size_t end)>& body) override;
  void when_done(std::function<void()> callback) override;
  void synchronize() override;

  // -- beyond the seam -----------------------------------------------------------------------

  int device() const { return ctx_->device(); }
  context& ctx() { return *ctx_; }
  // The first failure of an operation since creation, or success.
  status error() const override;
  // Waits for the stream (with a timeout) and reports the first failure: what synchronize()
  // would say if the seam let it return a status.
  status checked_synchronize(double timeout_ms = 60'000.0);

  // The grouped/dense rule of expert_matmuls: one per weight shape (n, k, type) once
  // calibrated, else the default (initially gemm_switch::uncalibrated_default()).
  void set_gemm_switch(gemm_switch sw) { default_switch_ = std::move(sw); }
  void set_gemm_switch(const expert_gemm_shape& shape, gemm_switch sw);
  const gemm_switch& gemm_switch_for(std::size_t n, std::size_t k, dtype type) const;
  // Sweeps `shape` on this backend's GPU (time_expert_gemms, blocking), installs the switch
  // fit_gemm_switch finds for it and returns the sweep (for the calibration file and reports).
  result<std::vector<gemm_timing>> calibrate_gemm_switch(const expert_gemm_shape& shape,
                                                         std::span<const std::size_t> rows_grid, int reps);
  // The expert GEMMs of one device and one projection (all of one shape and type), each
  // expert grouped or dense by its row count under gemm_switch_for(that shape); counts what
  // ran how.
  status expert_matmuls(std::span<const expert_matmul> batch, expert_gemm_stats* stats = nullptr);
  // The seam's expert batch (model::experts_step): expert_matmuls, its error kept (sticky).
  void matmul_batch(std::span<const gpu::batched_matmul> batch) override;

private:
  explicit cuda_backend(std::unique_ptr<context> ctx);
  // context::stage; null on failure (recorded).
  void* stage(const void* host, std::size_t bytes);
  bool ok_to_run();
  bool record(status s);

  // What a buffer's deleter needs to free in stream order: the stream while the backend
  // lives, nothing after (then cudaFree, which waits for the device).
  struct stream_state {
    std::mutex mutex;
    cudaStream_t stream = nullptr;
  };
  std::unique_ptr<context> ctx_;
  std::shared_ptr<stream_state> stream_state_ = std::make_shared<stream_state>();
  std::string name_;
  gemm_switch default_switch_ = gemm_switch::uncalibrated_default();
  struct shape_switch {
    std::size_t n, k;
    dtype type;
    gemm_switch sw;
  };
  std::vector<shape_switch> switches_;
  mutable std::mutex error_mutex_;  // error_ is written by the executor, read by anyone
  status error_;
};

// Registered with gpu/registry.hpp: visible devices (0 with the reason when none) and
// create_backend(options) for options.device_index.
std::size_t device_count(std::string& why_none);
result<std::unique_ptr<gpu::backend>> create_backend(const gpu::backend_options& options);

}  // namespace moert::cuda
