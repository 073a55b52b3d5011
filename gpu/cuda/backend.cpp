#include "gpu/cuda/backend.hpp"

#include "gpu/cuda/check.hpp"
#include "gpu/cuda/kernels.cuh"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

namespace moert::cuda {

namespace {

// Context scratch slots of the operations (0..2 belong to gemm.cpp).
constexpr int slot_scores = 3;
constexpr int slot_route = 4;
constexpr int slot_route_out = 5;

const cuda_matrix& storage_of(const gpu::matrix& m) {
  const gpu::matrix_storage* s = m.storage();
  if (s == nullptr || s->kind() != gpu::backend_kind::cuda) {
    std::fprintf(stderr, "moert: a %s matrix was passed to the cuda backend\n",
                 s ? gpu::to_string(s->kind()) : "empty");
    std::abort();
  }
  return static_cast<const cuda_matrix&>(*s);
}

}  // namespace

const device_matrix& device_matrix_of(const gpu::matrix& m) {
  return storage_of(m).device_copy();
}

// -- registry ----------------------------------------------------------------------------------

std::size_t device_count(std::string& why_none) {
  auto n = device_count();
  if (!n) {
    why_none = n.err().message;
    return 0;
  }
  return std::size_t(*n);
}

result<std::unique_ptr<gpu::backend>> create_backend(const gpu::backend_options& options) {
  auto b = cuda_backend::create(int(options.device_index));
  if (!b)
    return b.err();
  // The calibrated switch (the testbed's expert_gemm), else the backend keeps its default.
  if (options.expert_gemm.calibrated)
    (*b)->set_gemm_switch(gemm_switch{options.expert_gemm.dense_min_rows.value_or(std::numeric_limits<std::size_t>::max()),
                                      true, options.expert_gemm.source});
  return std::unique_ptr<gpu::backend>(std::move(*b));
}

// -- lifetime ----------------------------------------------------------------------------------

result<std::unique_ptr<cuda_backend>> cuda_backend::create(int device_idx) {
  auto ctx = context::create(device_idx);
  if (!ctx)
    return ctx.err();
  auto desc = describe_device(device_idx);
  std::unique_ptr<cuda_backend> b{new cuda_backend(std::move(*ctx))};
  b->name_ = "cuda:" + std::to_string(device_idx) + " (" + (desc ? *desc : std::string{"?"}) + ")";
  b->stream_state_->stream = b->ctx_->stream();
  // Keep freed blocks in the pool: the layer steps allocate and free scratch every call.
  cudaMemPool_t pool = nullptr;
  MOERT_CUDA_TRY(cudaDeviceGetDefaultMemPool(&pool, device_idx));
  std::uint64_t keep = std::numeric_limits<std::uint64_t>::max();
  MOERT_CUDA_TRY(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  return b;
}

cuda_backend::cuda_backend(std::unique_ptr<context> ctx) : ctx_(std::move(ctx)) {}

cuda_backend::~cuda_backend() {
  cudaSetDevice(ctx_->device());
  {
    std::lock_guard<std::mutex> lock{stream_state_->mutex};
    stream_state_->stream = nullptr;  // buffers that outlive us free with cudaFree
  }
  cudaStreamSynchronize(ctx_->stream());
}

bool cuda_backend::shares_memory_with(const gpu::backend& other) const {
  auto* c = dynamic_cast<const cuda_backend*>(&other);
  return c != nullptr && c->ctx_->device() == ctx_->device();
}

status cuda_backend::error() const {
  std::lock_guard<std::mutex> lock{error_mutex_};
  return error_;
}

bool cuda_backend::record(status s) {
  if (s.ok())
    return true;
  std::lock_guard<std::mutex> lock{error_mutex_};
  if (error_.ok()) {
    std::fprintf(stderr, "moert: %s: %s (later operations on this device are skipped)\n", name_.c_str(),
                 s.err().what().c_str());
    error_ = std::move(s);
  }
  return false;
}

bool cuda_backend::ok_to_run() {
  {
    std::lock_guard<std::mutex> lock{error_mutex_};
    if (!error_.ok())
      return false;
  }
  return record(ctx_->make_current());
}

void* cuda_backend::stage(const void* host, std::size_t bytes) {
  auto dev = ctx_->stage(host, bytes);
  if (!dev) {
    record(dev.err());
    return nullptr;
  }
  return *dev;
}

// Runs a kernel launcher and records a failed launch, naming it.
#define MOERT_LAUNCH(call)                                                            \
  do {                                                                                \
    if (!record(::moert::cuda::check_cuda((call), #call, __FILE__, __LINE__))) \
      return;                                                                         \
  } while (false)

// -- memory ------------------------------------------------------------------------------------

gpu::buffer cuda_backend::allocate(std::size_t num_bytes) {
  if (num_bytes == 0)
    return gpu::buffer{std::shared_ptr<void>{}, 0, gpu::backend_kind::cuda};
  int dev = ctx_->device();
  if (cudaSetDevice(dev) != cudaSuccess)
    throw std::bad_alloc{};
  void* ptr = nullptr;
  if (cudaMallocAsync(&ptr, num_bytes, ctx_->stream()) != cudaSuccess) {
    cudaGetLastError();
    throw std::bad_alloc{};
  }
  std::weak_ptr<stream_state> state = stream_state_;
  std::shared_ptr<void> memory{ptr, [dev, state](void* p) {
                                 int current = -1;
                                 cudaGetDevice(&current);
                                 cudaSetDevice(dev);
                                 bool queued = false;
                                 if (auto st = state.lock()) {
                                   std::lock_guard<std::mutex> lock{st->mutex};
                                   queued = st->stream && cudaFreeAsync(p, st->stream) == cudaSuccess;
                                 }
                                 if (!queued)
                                   cudaFree(p);
                                 if (current >= 0 && current != dev)
                                   cudaSetDevice(current);
                               }};
  return gpu::buffer{std::move(memory), num_bytes, gpu::backend_kind::cuda};
}

void cuda_backend::upload(void* dst, const void* src_host, std::size_t num_bytes) {
  if (num_bytes == 0 || !ok_to_run())
    return;
  // The caller's host bytes may die when we return (the loader uploads temporaries): small
  // uploads go through the pinned staging ring and stay asynchronous, large ones wait.
  constexpr std::size_t staged_max = 256u << 10;
  if (num_bytes <= staged_max) {
    record(ctx_->upload_staged(dst, src_host, num_bytes));
    return;
  }
  if (record(ctx_->upload(dst, src_host, num_bytes)))
    record(ctx_->synchronize());
}

void cuda_backend::download(void* dst_host, const void* src, std::size_t num_bytes) {
  if (!ok_to_run())
    return;
  if (num_bytes != 0 && !record(ctx_->download(dst_host, src, num_bytes)))
    return;
  record(ctx_->synchronize());
}

void cuda_backend::copy(void* dst, const void* src, std::size_t num_bytes) {
  if (num_bytes == 0 || !ok_to_run())
    return;
  record(ctx_->copy_device(dst, src, num_bytes));
}

result<gpu::matrix> cuda_backend::upload_matrix(dtype type, std::size_t cols, std::span<const gpu::matrix_part> parts) {
  std::size_t rows = 0;
  for (const gpu::matrix_part& part : parts) {
    // As on the cpu backend: widening to f32 is exact, a narrowing would change the weights.
    if (part.type != type && type != dtype::f32)
      return make_error(error_code::invalid_argument, "cannot hold " + std::string(safetensors_name(part.type)) +
                                                          " weights as " + std::string(safetensors_name(type)));
    rows += part.rows;
  }
  std::size_t elem = size_of(type);
  std::vector<std::byte> host(rows * cols * elem);
  std::byte* out = host.data();
  for (const gpu::matrix_part& part : parts) {
    std::size_t in_elem = size_of(part.type);
    const std::byte* base = static_cast<const std::byte*>(part.data);
    for (std::size_t r = 0; r < part.rows; ++r, out += cols * elem) {
      const std::byte* row = base + r * part.row_stride * in_elem;
      if (part.col_stride == 1 && part.type == type) {
        std::memcpy(out, row, cols * elem);
      } else if (part.col_stride == 1) {
        convert_to_f32(part.type, row, cols, reinterpret_cast<float*>(out));
      } else {
        for (std::size_t c = 0; c < cols; ++c) {
          const std::byte* src = row + c * part.col_stride * in_elem;
          if (part.type == type) {
            std::memcpy(out + c * elem, src, elem);
          } else {
            float v;
            convert_to_f32(part.type, src, 1, &v);
            std::memcpy(out + c * elem, &v, sizeof v);
          }
        }
      }
    }
  }
  auto m = cuda::upload_matrix(*ctx_, type, host.data(), rows, cols);
  if (!m)
    return m.err();
  MOERT_TRY(ctx_->synchronize());  // `host` dies on return
  return gpu::matrix{std::make_unique<const cuda_matrix>(std::move(*m))};
}

// -- operations --------------------------------------------------------------------------------

void cuda_backend::matmul(const float* x, std::size_t num_rows, const gpu::matrix& w, float* y, const float* bias) {
  if (num_rows == 0 || !ok_to_run())
    return;
  if (!record(cuda::matmul(*ctx_, x, num_rows, device_matrix_of(w), y)))
    return;
  if (bias)
    MOERT_LAUNCH(kernels::add_bias(y, bias, num_rows, w.rows(), ctx_->stream()));
}

void cuda_backend::rms_norm(const float* x, std::size_t num_rows, std::size_t dim, std::size_t row_stride,
                            const float* weight, float eps, float* out) {
  if (!ok_to_run())
    return;
  MOERT_LAUNCH(kernels::rms_norm(x, row_stride, weight, num_rows, dim, eps, out, row_stride, ctx_->stream()));
}

void cuda_backend::rope(float* x, std::size_t num_rows, std::size_t row_stride, std::size_t num_heads,
                        std::size_t head_stride, std::size_t dim, gpu::rope_style style, const float* table_host,
                        const std::size_t* positions_host) {
  if (num_rows == 0 || !ok_to_run())
    return;
  // Only the rows' own angles travel: row r's dim floats, in row order.
  std::vector<float> angles(num_rows * dim);
  for (std::size_t r = 0; r < num_rows; ++r)
    std::memcpy(angles.data() + r * dim, table_host + positions_host[r] * dim, dim * sizeof(float));
  auto* table = static_cast<const float*>(stage(angles.data(), angles.size() * sizeof(float)));
  if (table == nullptr)
    return;
  MOERT_LAUNCH(kernels::rope(x, num_rows, row_stride, 0, num_heads, head_stride, dim / 2, nullptr, table,
                             style == gpu::rope_style::interleaved, ctx_->stream()));
}

void cuda_backend::attention(const float* q, std::span<const gpu::kv_rows> rows_host, const gpu::attention_shape& s,
                             float* out) {
  std::size_t n = rows_host.size();
  if (n == 0 || !ok_to_run())
    return;
  std::vector<const float*> keys(n), values(n);
  std::vector<std::int32_t> positions(n);
  std::size_t max_positions = 0;
  for (std::size_t t = 0; t < n; ++t) {
    keys[t] = rows_host[t].keys;
    values[t] = rows_host[t].values;
    positions[t] = std::int32_t(rows_host[t].num_positions);
    max_positions = std::max(max_positions, rows_host[t].num_positions);
  }
  auto scores = ctx_->scratch(slot_scores, n * s.num_heads * max_positions * sizeof(float));
  if (!scores) {
    record(scores.err());
    return;
  }
  auto* k = static_cast<const float* const*>(stage(keys.data(), n * sizeof(float*)));
  auto* v = static_cast<const float* const*>(stage(values.data(), n * sizeof(float*)));
  auto* p = static_cast<const std::int32_t*>(stage(positions.data(), n * sizeof(std::int32_t)));
  if (!k || !v || !p)
    return;
  std::size_t q_stride = s.num_heads * s.head_dim;
  MOERT_LAUNCH(kernels::attend(q, q_stride, k, v, s.kv_stride, s.head_dim, s.num_heads / s.num_kv_heads, p,
                               max_positions, n, s.num_heads, s.head_dim, s.head_dim, s.scale,
                               static_cast<float*>(*scores), out, q_stride, ctx_->stream()));
}

void cuda_backend::mla_attention(const float* q, std::span<const gpu::kv_rows> rows_host, const gpu::mla_shape& s,
                                 float* out) {
  std::size_t n = rows_host.size();
  if (n == 0 || !ok_to_run())
    return;
  std::vector<const float*> rows(n);
  std::vector<std::int32_t> positions(n);
  std::size_t max_positions = 0;
  for (std::size_t t = 0; t < n; ++t) {
    rows[t] = rows_host[t].keys;
    positions[t] = std::int32_t(rows_host[t].num_positions);
    max_positions = std::max(max_positions, rows_host[t].num_positions);
  }
  auto scores = ctx_->scratch(slot_scores, n * s.num_heads * max_positions * sizeof(float));
  if (!scores) {
    record(scores.err());
    return;
  }
  auto* r = static_cast<const float* const*>(stage(rows.data(), n * sizeof(float*)));
  auto* p = static_cast<const std::int32_t*>(stage(positions.data(), n * sizeof(std::int32_t)));
  if (!r || !p)
    return;
  // Keys and values are the same rows; every head reads the whole shared row (offset 0).
  MOERT_LAUNCH(kernels::attend(q, s.num_heads * s.key_dim, r, r, s.row_stride, 0, 1, p, max_positions, n,
                               s.num_heads, s.key_dim, s.value_dim, s.scale, static_cast<float*>(*scores), out,
                               s.num_heads * s.value_dim, ctx_->stream()));
}

void cuda_backend::route(float* logits, std::size_t num_rows, const gpu::route_params& p,
                         gpu::routed_slot* routes_host) {
  if (num_rows == 0 || !ok_to_run())
    return;
  if (p.num_groups == 0 || p.num_groups > 64 || p.num_experts % p.num_groups != 0 || p.top_k > p.num_experts ||
      p.topk_group > p.num_groups || p.top_k == 0) {
    record(make_error(error_code::invalid_argument,
                      "cuda route: " + std::to_string(p.num_experts) + " experts, top " + std::to_string(p.top_k) +
                          ", " + std::to_string(p.num_groups) + " groups (at most 64, dividing the experts), top " +
                          std::to_string(p.topk_group) + " groups is not a valid selection"));
    return;
  }
  auto scratch = ctx_->scratch(slot_route, num_rows * p.num_experts * sizeof(float));
  auto outs = ctx_->scratch(slot_route_out, num_rows * p.top_k * (sizeof(std::int32_t) + sizeof(float)));
  if (!scratch || !outs) {
    record(!scratch ? scratch.err() : outs.err());
    return;
  }
  auto* experts = static_cast<std::int32_t*>(*outs);
  auto* weights = reinterpret_cast<float*>(experts + num_rows * p.top_k);
  MOERT_LAUNCH(kernels::route_topk(logits, num_rows, p.num_experts, p.top_k, p.num_groups, p.topk_group,
                                   p.renormalize, p.scaling, static_cast<float*>(*scratch), experts, weights,
                                   ctx_->stream()));
  std::vector<std::int32_t> e(num_rows * p.top_k);
  std::vector<float> w(num_rows * p.top_k);
  if (!record(ctx_->download(e.data(), experts, e.size() * sizeof(std::int32_t))) ||
      !record(ctx_->download(w.data(), weights, w.size() * sizeof(float))) || !record(ctx_->synchronize()))
    return;
  for (std::size_t i = 0; i < e.size(); ++i)
    routes_host[i] = {e[i], w[i]};
}

void cuda_backend::swiglu(const float* gate_up, std::size_t num_rows, std::size_t dim, float* out) {
  if (!ok_to_run())
    return;
  MOERT_LAUNCH(kernels::silu_mul(gate_up, num_rows, dim, out, ctx_->stream()));
}

void cuda_backend::sigmoid_gate(const float* gate, std::size_t num_rows, std::size_t dim, float* x) {
  if (!ok_to_run())
    return;
  MOERT_LAUNCH(kernels::scale_by_sigmoid(x, gate, num_rows, dim, ctx_->stream()));
}

void cuda_backend::add(float* x, const float* y, std::size_t count) {
  if (!ok_to_run())
    return;
  MOERT_LAUNCH(kernels::add(x, y, count, ctx_->stream()));
}

void cuda_backend::gather_rows(const float* const* src_rows_host, std::size_t num_rows, std::size_t dim, float* dst) {
  if (num_rows == 0 || !ok_to_run())
    return;
  auto* rows = static_cast<const float* const*>(stage(src_rows_host, num_rows * sizeof(float*)));
  if (rows == nullptr)
    return;
  MOERT_LAUNCH(kernels::load_rows(rows, num_rows, dim, dst, ctx_->stream()));
}

void cuda_backend::scatter_rows(const float* src, std::size_t src_stride, std::size_t num_rows, std::size_t dim,
                                float* const* dst_rows_host) {
  if (num_rows == 0 || !ok_to_run())
    return;
  auto* rows = static_cast<float* const*>(stage(dst_rows_host, num_rows * sizeof(float*)));
  if (rows == nullptr)
    return;
  MOERT_LAUNCH(kernels::store_rows(src, src_stride, rows, nullptr, num_rows, dim, ctx_->stream()));
}

void cuda_backend::copy_rows(const float* src, std::size_t src_stride, float* dst, std::size_t dst_stride,
                             std::size_t num_rows, std::size_t dim) {
  if (num_rows == 0 || dim == 0 || !ok_to_run())
    return;
  MOERT_LAUNCH(cudaMemcpy2DAsync(dst, dst_stride * sizeof(float), src, src_stride * sizeof(float),
                                 dim * sizeof(float), num_rows, cudaMemcpyDeviceToDevice, ctx_->stream()));
}

void cuda_backend::weight_rows(const float* x, std::size_t num_rows, std::size_t dim, const float* weights_host,
                               float* const* out_rows_host) {
  if (num_rows == 0 || !ok_to_run())
    return;
  auto* w = static_cast<const float*>(stage(weights_host, num_rows * sizeof(float)));
  auto* rows = static_cast<float* const*>(stage(out_rows_host, num_rows * sizeof(float*)));
  if (!w || !rows)
    return;
  MOERT_LAUNCH(kernels::store_rows(x, dim, rows, w, num_rows, dim, ctx_->stream()));
}

void cuda_backend::combine(const float* const* weighted_host, std::size_t top_k, const float* side,
                           std::size_t num_rows, std::size_t dim, float* x) {
  if (num_rows == 0 || !ok_to_run())
    return;
  // top_k 0 (a dense layer): only the side output is added, there are no rows to stage.
  const float* const* rows = nullptr;
  if (top_k > 0) {
    rows = static_cast<const float* const*>(stage(weighted_host, num_rows * top_k * sizeof(float*)));
    if (rows == nullptr)
      return;
  }
  MOERT_LAUNCH(kernels::combine(x, dim, top_k, rows, nullptr, side, num_rows, ctx_->stream()));
}

// -- scheduling --------------------------------------------------------------------------------

void cuda_backend::concurrent(std::size_t num_tasks, std::size_t,
                              const std::function<void(gpu::backend&, std::size_t, std::size_t)>& body) {
  if (num_tasks != 0)
    body(*this, 0, num_tasks);
}

namespace {

void CUDART_CB run_callback(void* data) {
  std::unique_ptr<std::function<void()>> fn{static_cast<std::function<void()>*>(data)};
  (*fn)();
}

}  // namespace

void cuda_backend::when_done(std::function<void()> callback) {
  // After a failure the completion is dropped: it would deliver what skipped operations left
  // behind. The device executor reads error() after the task and fails it instead.
  if (!ok_to_run())
    return;
  auto* fn = new std::function<void()>(std::move(callback));
  if (!record(check_cuda(cudaLaunchHostFunc(ctx_->stream(), run_callback, fn), "cudaLaunchHostFunc", __FILE__,
                         __LINE__)))
    delete fn;
}

void cuda_backend::synchronize() {
  record(ctx_->synchronize());
}

status cuda_backend::checked_synchronize(double timeout_ms) {
  record(ctx_->synchronize(timeout_ms));
  return error();
}

void cuda_backend::set_gemm_switch(const expert_gemm_shape& shape, gemm_switch sw) {
  for (shape_switch& s : switches_)
    if (s.n == shape.n && s.k == shape.k && s.type == shape.type) {
      s.sw = std::move(sw);
      return;
    }
  switches_.push_back({shape.n, shape.k, shape.type, std::move(sw)});
}

const gemm_switch& cuda_backend::gemm_switch_for(std::size_t n, std::size_t k, dtype type) const {
  for (const shape_switch& s : switches_)
    if (s.n == n && s.k == k && s.type == type)
      return s.sw;
  return default_switch_;
}

result<std::vector<gemm_timing>> cuda_backend::calibrate_gemm_switch(const expert_gemm_shape& shape,
                                                                     std::span<const std::size_t> rows_grid,
                                                                     int reps) {
  MOERT_TRY(error());
  auto sweep = time_expert_gemms(*ctx_, shape, rows_grid, reps);
  if (!sweep)
    return sweep.err();
  auto sw = fit_gemm_switch(*sweep, "calibrated on " + name_ + " for " + std::to_string(shape.num_experts) +
                                        " experts of " + std::to_string(shape.n) + "x" + std::to_string(shape.k) +
                                        " " + std::string(safetensors_name(shape.type)));
  if (!sw)
    return sw.err();
  set_gemm_switch(shape, std::move(*sw));
  return sweep;
}

status cuda_backend::expert_matmuls(std::span<const expert_matmul> batch, expert_gemm_stats* stats) {
  MOERT_TRY(error());
  MOERT_TRY(ctx_->make_current());
  std::vector<expert_gemm> gemms;
  gemms.reserve(batch.size());
  for (const expert_matmul& m : batch)
    gemms.push_back({&device_matrix_of(*m.w), m.x, m.y, m.rows});
  if (gemms.empty())
    return {};
  const device_matrix& first = *gemms.front().w;
  status s = run_expert_gemms(*ctx_, gemms, gemm_switch_for(first.rows, first.cols, first.type), stats);
  record(s);
  return s;
}

void cuda_backend::matmul_batch(std::span<const gpu::batched_matmul> batch) {
  if (!ok_to_run())
    return;
  std::vector<expert_matmul> gemms;
  gemms.reserve(batch.size());
  for (const gpu::batched_matmul& m : batch)
    gemms.push_back({m.w, m.x, m.y, m.num_rows});
  (void)expert_matmuls(gemms);  // a failure is recorded: error() / checked_synchronize() report it
}

}  // namespace moert::cuda
