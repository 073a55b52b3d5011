#pragma once

// The cpu backend: gpu::backend over today's kernels (gemm.hpp, ops.hpp, thread_pool.hpp),
// bit-identical to calling them directly and batch-invariant. Memory is host memory (64-byte
// aligned malloc), matrices are packed_matrix panels in the checkpoint's type, operations run
// before they return, when_done() calls back at once.
//
// Thread safety: as gpu::backend. With num_threads > 1 the backend owns a thread_pool whose
// parallel_for is driven by one thread at a time (the device thread); a backend with one
// thread has no state and may be used by several threads at once.

#include "gpu/backend.hpp"
#include "gpu/cpu/gemm.hpp"
#include "gpu/cpu/thread_pool.hpp"

#include <memory>

namespace moert::cpu {

// The packed panels of one matrix as the cpu backend holds them.
class cpu_matrix final : public gpu::matrix_storage {
public:
  explicit cpu_matrix(packed_matrix packed)
      : gpu::matrix_storage(gpu::backend_kind::cpu, packed.type(), packed.rows(), packed.cols(),
                            packed.num_bytes()),
        packed_(std::move(packed)) {}
  const packed_matrix& packed() const { return packed_; }

private:
  packed_matrix packed_;
};

// The packed matrix behind a cpu-backend handle (a programming error, and an abort, for a
// handle of another backend).
const packed_matrix& packed_of(const gpu::matrix& m);

class cpu_backend final : public gpu::backend {
public:
  // `num_threads` counts the calling thread; 1: no pool, everything inline.
  explicit cpu_backend(std::size_t num_threads);
  // Uses `pool` (may be null: inline), owned by the caller and outliving this backend.
  explicit cpu_backend(thread_pool* pool);

  gpu::backend_kind kind() const override { return gpu::backend_kind::cpu; }
  std::string name() const override;
  bool shares_memory_with(const gpu::backend& other) const override {
    return other.kind() == gpu::backend_kind::cpu;
  }
  std::size_t num_threads() const { return pool_ ? pool_->num_threads() : 1; }
  thread_pool* pool() const { return pool_; }

  gpu::buffer allocate(std::size_t num_bytes) override;
  void upload(void* dst, const void* src_host, std::size_t num_bytes) override;
  void download(void* dst_host, const void* src, std::size_t num_bytes) override;
  void copy(void* dst, const void* src, std::size_t num_bytes) override;
  result<gpu::matrix> upload_matrix(dtype type, std::size_t cols, std::span<const gpu::matrix_part> parts) override;

  void matmul(const float* x, std::size_t num_rows, const gpu::matrix& w, float* y, const float* bias) override;
  // One pool barrier for the whole batch (cpu::matmul_batch); the bits of matmul per entry.
  void matmul_batch(std::span<const gpu::batched_matmul> batch) override;
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
  void copy_rows(const float* src, std::size_t src_stride, float* dst, std::size_t dst_stride,
                 std::size_t num_rows, std::size_t dim) override;
  void weight_rows(const float* x, std::size_t num_rows, std::size_t dim, const float* weights_host,
                   float* const* out_rows_host) override;
  void combine(const float* const* weighted_host, std::size_t top_k, const float* side, std::size_t num_rows,
               std::size_t dim, float* x) override;

  void concurrent(std::size_t num_tasks, std::size_t work,
                  const std::function<void(gpu::backend& lane, std::size_t begin, std::size_t end)>& body) override;
  void when_done(std::function<void()> callback) override { callback(); }
  void synchronize() override {}

private:
  std::unique_ptr<thread_pool> owned_pool_;
  thread_pool* pool_ = nullptr;
};

}  // namespace moert::cpu
