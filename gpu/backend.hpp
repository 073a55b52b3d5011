#pragma once

// The device seam: one small interface every compute backend implements (in the spirit of
// ggml's backend interface), and the only gpu/ header model/ includes. A backend owns
// memory (host memory for cpu, device memory for cuda), holds weight matrices uploaded from
// the checkpoint's layout, and runs the operations one decoder layer needs. The layer steps
// (model/layers.cpp) are written once against these operations.
//
// Memory. Every pointer argument is in this backend's memory (a `buffer` it allocated, a
// matrix it uploaded, or memory it shares: see shares_memory_with) unless its name ends in
// `_host`: those are host memory, small per-row parameters (positions, routing weights, row
// pointers) read before the call returns. On the cpu backend both are host memory, so host
// vectors serve directly. Units: element counts (floats) unless a name says bytes; rows are
// contiguous unless a `*_stride` (in floats) says otherwise. Activations are f32.
//
// Ordering. Operations run in the order they are issued (a stream: the cpu backend runs each
// before returning; cuda enqueues them on the backend's one stream). when_done() is how a
// device task completes without blocking an actor; synchronize() and download() block the
// calling thread (a device executor, a test or the reference forward, never an actor).
//
// Determinism. The cpu backend is the reference: every operation is per row with a fixed
// reduction order, so a row's bits never depend on the other rows of its batch or on the
// thread count (DESIGN.md §4). Other backends keep greedy tokens and stay within tolerance.
//
// Thread safety. Memory functions (allocate, upload, download, copy, upload_matrix) may be
// called from any thread. Operations, concurrent(), when_done() and synchronize() are called
// by one thread at a time: the device executor that owns the backend. matrix and buffer
// contents are read by operations only; a matrix is immutable once uploaded and may be read
// by every backend that shares its memory, from any thread.

#include "core/dtype.hpp"
#include "core/error.hpp"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace moert::gpu {

enum class backend_kind { cpu, cuda };
inline const char* to_string(backend_kind kind) { return kind == backend_kind::cuda ? "cuda" : "cpu"; }
// The kind a name spells ("cpu" or "cuda"); nullopt for anything else, so each caller can
// name the option or field the name came from.
inline std::optional<backend_kind> parse_backend_kind(std::string_view name) {
  if (name == "cpu")
    return backend_kind::cpu;
  if (name == "cuda")
    return backend_kind::cuda;
  return std::nullopt;
}

// -- memory ---------------------------------------------------------------------------------

// Bytes owned by one backend. Move-only; freeing it returns the memory to its backend's
// allocator (the memory, not the backend object, keeps what it needs alive, so a buffer may
// outlive the backend instance that allocated it). Contents are unspecified until written.
class buffer {
public:
  buffer() = default;
  // For backends: `memory` frees the bytes when its last reference goes.
  buffer(std::shared_ptr<void> memory, std::size_t num_bytes, backend_kind kind)
      : memory_(std::move(memory)), num_bytes_(num_bytes), kind_(kind) {}
  buffer(buffer&&) noexcept = default;
  buffer& operator=(buffer&&) noexcept = default;
  buffer(const buffer&) = delete;
  buffer& operator=(const buffer&) = delete;

  void* data() const { return memory_.get(); }
  float* floats() const { return static_cast<float*>(memory_.get()); }
  std::size_t num_bytes() const { return num_bytes_; }
  std::size_t num_floats() const { return num_bytes_ / sizeof(float); }
  bool empty() const { return num_bytes_ == 0; }
  backend_kind kind() const { return kind_; }

private:
  std::shared_ptr<void> memory_;
  std::size_t num_bytes_ = 0;
  backend_kind kind_ = backend_kind::cpu;
};

// -- weights --------------------------------------------------------------------------------

// Where upload_matrix() reads some rows of a weight in the checkpoint's layout: element
// (r, c) of this part is at data + (r * row_stride + c * col_stride) elements of `type`,
// little-endian, any alignment, in host memory. col_stride 1 is a row-major slice;
// row_stride 1 reads a transposed matrix.
struct matrix_part {
  const void* data;
  dtype type;
  std::size_t rows;
  std::size_t row_stride;
  std::size_t col_stride = 1;
};

// What a backend keeps for one uploaded matrix, in whatever layout its matmul wants (the cpu
// backend: panels for its batch-invariant GEMM). Backends derive from it.
class matrix_storage {
public:
  matrix_storage(backend_kind kind, dtype type, std::size_t rows, std::size_t cols, std::size_t num_bytes)
      : kind_(kind), type_(type), rows_(rows), cols_(cols), num_bytes_(num_bytes) {}
  virtual ~matrix_storage() = default;
  matrix_storage(const matrix_storage&) = delete;
  matrix_storage& operator=(const matrix_storage&) = delete;

  backend_kind kind() const { return kind_; }
  dtype type() const { return type_; }
  std::size_t rows() const { return rows_; }
  std::size_t cols() const { return cols_; }
  std::size_t num_bytes() const { return num_bytes_; }

private:
  backend_kind kind_;
  dtype type_;
  std::size_t rows_, cols_, num_bytes_;
};

// A weight W[rows = out_features][cols = in_features] (the nn.Linear layout) resident on one
// backend: an opaque, move-only handle. Empty (0 × 0) when not loaded on this device (an
// expert device holds only its experts; a part of a cluster only its part).
class matrix {
public:
  matrix() = default;
  explicit matrix(std::unique_ptr<const matrix_storage> storage) : storage_(std::move(storage)) {}

  bool empty() const { return !storage_; }
  std::size_t rows() const { return storage_ ? storage_->rows() : 0; }
  std::size_t cols() const { return storage_ ? storage_->cols() : 0; }
  // The type the weights are held in (f32, bf16 or f16); f32 when empty.
  dtype type() const { return storage_ ? storage_->type() : dtype::f32; }
  // Bytes held on the device.
  std::size_t num_bytes() const { return storage_ ? storage_->num_bytes() : 0; }
  // For backends: the storage, to be cast to their own type after checking kind().
  const matrix_storage* storage() const { return storage_.get(); }

private:
  std::unique_ptr<const matrix_storage> storage_;
};

// -- operation parameters -------------------------------------------------------------------

// One routed expert of a row: expert index and routing weight.
struct routed_slot {
  std::int32_t expert;
  float weight;
};

// One GEMM of a device's expert batch (backend::matmul_batch): y (num_rows × w->rows()) =
// x (num_rows × w->cols()) · wᵀ, as matmul.
struct batched_matmul {
  const matrix* w;
  const float* x;
  float* y;
  std::size_t num_rows;
};

// Router selection (Hugging Face / DeepSeek semantics): f32 softmax over num_experts, then
// the top_k among the eligible experts (ties to the lower index). num_groups > 1 is
// group-limited greedy: only the topk_group groups (of num_experts / num_groups consecutive
// experts) with the best maximum probability are eligible. Weights are the probabilities,
// divided by their sum when `renormalize`, then multiplied by `scaling`; a row's top_k slots
// are sorted by expert index (the combine's order, DESIGN.md §4).
struct route_params {
  std::size_t num_experts = 0;
  std::size_t top_k = 0;
  std::size_t num_groups = 1;
  std::size_t topk_group = 1;
  bool renormalize = false;
  float scaling = 1.0f;
};

enum class rope_style {
  rotate_half,  // element j pairs with j + dim/2 (Llama, Qwen, Mixtral)
  interleaved,  // elements (2i, 2i+1) form pair i (DeepSeek-V2)
};

// One query row's view of its sequence's cache: rows [0, num_positions) of keys (and values)
// at kv_stride floats apart, in backend memory. values is unused by mla_attention.
struct kv_rows {
  const float* keys;
  const float* values;
  std::size_t num_positions;
};

// Grouped-query attention: query head h reads kv head h / (num_heads / num_kv_heads); a kv row
// holds num_kv_heads × head_dim floats. Scores are multiplied by `scale` before the softmax.
struct attention_shape {
  std::size_t num_heads = 0;
  std::size_t num_kv_heads = 0;
  std::size_t head_dim = 0;
  std::size_t kv_stride = 0;
  float scale = 1.0f;
};

// MLA with absorbed weights: one shared cache row per position whose first key_dim floats are
// the key and whose first value_dim floats are also the value.
struct mla_shape {
  std::size_t num_heads = 0;
  std::size_t key_dim = 0;
  std::size_t value_dim = 0;
  std::size_t row_stride = 0;
  float scale = 1.0f;
};

// -- the backend ----------------------------------------------------------------------------

class backend {
public:
  virtual ~backend() = default;
  backend(const backend&) = delete;
  backend& operator=(const backend&) = delete;

  virtual backend_kind kind() const = 0;
  // For logs and reports: "cpu (avx512, 4 threads)", "cuda:0 (NVIDIA H200)".
  virtual std::string name() const = 0;
  // True when this backend's operations may read memory and matrices `other` allocated (every
  // cpu backend shares host memory; a cuda backend only its own device's).
  virtual bool shares_memory_with(const backend& other) const = 0;

  // -- memory ------------------------------------------------------------------------------

  // `num_bytes` of backend memory, 64-byte aligned. Throws std::bad_alloc when exhausted
  // (as std::vector does; callers of the hot path never see it in practice).
  virtual buffer allocate(std::size_t num_bytes) = 0;
  // Copies between host memory and backend memory (dst/src in backend memory, *_host on the
  // host). upload() may return before the copy is done only if `src_host` stays valid until
  // the next synchronize(); the cpu backend copies at once. download() blocks until the bytes
  // are on the host (and every operation issued before it is done).
  virtual void upload(void* dst, const void* src_host, std::size_t num_bytes) = 0;
  virtual void download(void* dst_host, const void* src, std::size_t num_bytes) = 0;
  // Backend-to-backend memory copy, ordered with the operations.
  virtual void copy(void* dst, const void* src, std::size_t num_bytes) = 0;
  // allocate() + upload() of host floats.
  buffer upload_floats(std::span<const float> values_host);

  // A weight from the rows of `parts` one after another (rows = the sum of their rows, `cols`
  // columns each), held as `type`. Each part's type must be `type`, or `type` must be f32 (an
  // exact widening); a narrowing is an error. The parts' host memory may be released as soon
  // as this returns.
  virtual result<matrix> upload_matrix(dtype type, std::size_t cols, std::span<const matrix_part> parts) = 0;

  // -- operations ------------------------------------------------------------------------
  // x/in: inputs, out/y: outputs; "may alias" is said where in-place is allowed.

  // y[r][n] = Σ_k x[r][k] · w[n][k] (+ bias[n]) for r < num_rows, n < w.rows(). x rows have
  // w.cols() floats, y rows w.rows(); bias (w.rows() floats) may be null. No aliasing. The sum
  // is one sequential fma chain over k from +0 on the cpu backend, in any batch.
  virtual void matmul(const float* x, std::size_t num_rows, const matrix& w, float* y,
                      const float* bias = nullptr) = 0;

  // Every GEMM of `batch`: a device's experts of one step (weights of one shape and type, rows
  // may differ, outputs disjoint). By default matmul per entry in order (the cpu backend: the
  // bits of matmul); cuda runs the experts with few rows as one grouped GEMM and the others
  // dense, by its calibrated switch (EPS-MoE).
  virtual void matmul_batch(std::span<const batched_matmul> batch) {
    for (const batched_matmul& m : batch)
      matmul(m.x, m.num_rows, *m.w, m.y);
  }

  // out = x / sqrt(mean(x²) + eps) · weight per row of `dim` floats (Hugging Face RMSNorm,
  // statistics in f32). Rows start row_stride floats apart in both x and out; out may alias x.
  // The per-head norm (q_norm / k_norm) is this with num_rows = tokens × heads, dim =
  // row_stride = head_dim.
  virtual void rms_norm(const float* x, std::size_t num_rows, std::size_t dim, std::size_t row_stride,
                        const float* weight, float eps, float* out) = 0;

  // Rotary embedding in place on `dim` floats at x + r·row_stride + h·head_stride for every
  // row r < num_rows and head h < num_heads. Row r is at position positions_host[r]; the
  // position p's angles are table_host + p·dim: dim/2 cos values, then dim/2 sin values
  // (model::rope_table's layout).
  virtual void rope(float* x, std::size_t num_rows, std::size_t row_stride, std::size_t num_heads,
                    std::size_t head_stride, std::size_t dim, rope_style style, const float* table_host,
                    const std::size_t* positions_host) = 0;

  // Causal attention of query row r (num_heads × head_dim floats at q + r·num_heads·head_dim)
  // over rows_host[r]; out has the same layout as q. Every reduction in position order.
  virtual void attention(const float* q, std::span<const kv_rows> rows_host, const attention_shape& shape,
                         float* out) = 0;
  // MLA shared-row attention: query row r is num_heads × key_dim floats, its output
  // num_heads × value_dim; rows_host[r].keys are its cache rows (row_stride apart).
  virtual void mla_attention(const float* q, std::span<const kv_rows> rows_host, const mla_shape& shape,
                             float* out) = 0;

  // logits: num_rows × p.num_experts router outputs, overwritten (softmax scratch). routes_host:
  // num_rows × p.top_k slots (route_params says how they are chosen).
  virtual void route(float* logits, std::size_t num_rows, const route_params& p, routed_slot* routes_host) = 0;

  // out[r][i] = silu(gate_up[r][i]) · gate_up[r][dim + i], silu(g) = g / (1 + e^-g);
  // gate_up rows hold 2·dim floats (gate, then up), out rows dim floats.
  virtual void swiglu(const float* gate_up, std::size_t num_rows, std::size_t dim, float* out) = 0;
  // x[r][i] = sigmoid(gate[r]) · x[r][i] (qwen2_moe's shared-expert gate); gate: num_rows floats.
  virtual void sigmoid_gate(const float* gate, std::size_t num_rows, std::size_t dim, float* x) = 0;
  // x[i] += y[i] for i < count (the residual).
  virtual void add(float* x, const float* y, std::size_t count) = 0;

  // dst row r = src_rows_host[r] (dim floats each, rows anywhere in backend memory): embedding
  // lookup, the expert re-batching gather.
  virtual void gather_rows(const float* const* src_rows_host, std::size_t num_rows, std::size_t dim,
                           float* dst) = 0;
  // dst_rows_host[r] = src row r (rows src_stride apart): writing K/V rows into caches.
  virtual void scatter_rows(const float* src, std::size_t src_stride, std::size_t num_rows, std::size_t dim,
                            float* const* dst_rows_host) = 0;
  // A strided 2-D copy: dst + r·dst_stride = src + r·src_stride, dim floats, r < num_rows.
  virtual void copy_rows(const float* src, std::size_t src_stride, float* dst, std::size_t dst_stride,
                         std::size_t num_rows, std::size_t dim) = 0;

  // The weighted combine. weight_rows: out_rows_host[r][i] = x[r][i] · weights_host[r] (an
  // expert's output scaled by each row's routing weight). combine: x[r] += (Σ_s
  // weighted_host[r·top_k + s]) + side[r], the sum from +0 in slot order (= expert order);
  // weighted_host holds num_rows × top_k row pointers (dim floats each, anywhere in backend
  // memory); side (num_rows × dim) may be null.
  virtual void weight_rows(const float* x, std::size_t num_rows, std::size_t dim, const float* weights_host,
                           float* const* out_rows_host) = 0;
  virtual void combine(const float* const* weighted_host, std::size_t top_k, const float* side,
                       std::size_t num_rows, std::size_t dim, float* x) = 0;

  // -- scheduling --------------------------------------------------------------------------

  // Calls body(lane, begin, end) over disjoint ranges covering [0, num_tasks), possibly at the
  // same time on different threads or streams. A lane is a backend sharing this one's memory
  // and matrices, used only inside its call; ranges must write disjoint outputs. `work`
  // (multiply-adds, roughly) says whether spreading pays (the cpu backend runs small work
  // inline). Blocks until every range has been issued.
  virtual void concurrent(std::size_t num_tasks, std::size_t work,
                          const std::function<void(backend& lane, std::size_t begin, std::size_t end)>& body) = 0;

  // Calls `callback` once every operation issued before this call has finished: the cpu
  // backend calls it at once on this thread, cuda from its completion thread. The callback
  // must not block (it posts a message). This is how a device task completes. A backend that
  // has failed (error()) never calls it: the device executor fails the task instead.
  virtual void when_done(std::function<void()> callback) = 0;
  // Blocks the calling thread until every operation issued so far has finished.
  virtual void synchronize() = 0;
  // The first failure of an operation since creation, or success. Operations return void, so
  // a backend that can fail (cuda) keeps its first error and skips later operations; the
  // device executor reads this after each task so the task fails instead of delivering what
  // skipped operations left behind. The cpu backend never fails.
  virtual status error() const { return status::success(); }

protected:
  backend() = default;
};

inline buffer backend::upload_floats(std::span<const float> values_host) {
  buffer out = allocate(values_host.size_bytes());
  if (!values_host.empty())
    upload(out.data(), values_host.data(), values_host.size_bytes());
  return out;
}

}  // namespace moert::gpu
