#pragma once

// A stand-in for a device backend, for tests on machines without a GPU: it computes with the
// cpu backend, bit for bit, but keeps the memory discipline a GPU imposes (gpu/backend.hpp's
// rule: a pointer is backend memory unless its name ends `_host`).
//
// - Its buffers live apart: allocate() hands out addresses in a reserved range of address
//   space that is never readable (PROT_NONE), and keeps the bytes in a separate shadow
//   allocation that the operations read and write. Host code that dereferences a device
//   pointer (a row not downloaded, a residual read on the host) faults at once, as it would
//   read garbage on a GPU.
// - Every pointer an operation receives is checked: a device argument must lie in a buffer
//   this backend allocated and has not freed (a host vector, another device's buffer or a
//   freed one is refused), a `_host` argument must not lie in device memory, and a matrix
//   must be one this backend uploaded. The first violation is recorded (sticky, like the
//   cuda backend's errors) and every later operation is skipped.
// - It shares memory with no other backend (two instances are two devices), so an attention
//   device that reads its expert device's weights is caught too.
//
// Not for the product: tests make the engine build these through
// gpu::override_backend_for_tests. Thread safety: memory functions from any thread (a mutex
// guards the allocation table); operations from one thread at a time, as for every backend.

#include "gpu/backend.hpp"
#include "gpu/cpu/backend.hpp"

#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace moert::test {

// The never-readable range device addresses come from: 64 GiB of address space, reserved once
// (no memory behind it), handed out by a bump pointer and never reused, so a freed buffer's
// address stays invalid.
class device_address_space {
public:
  static device_address_space& instance() {
    static device_address_space space;
    return space;
  }
  // A fresh 64-byte aligned address with `num_bytes` (and a 64-byte gap) after it.
  std::uintptr_t take(std::size_t num_bytes) {
    std::size_t rounded = (num_bytes + 63) / 64 * 64 + 64;
    std::uintptr_t at = base_ + next_.fetch_add(rounded);
    if (at + rounded > base_ + size_)
      throw std::bad_alloc();
    return at;
  }
  bool contains(const void* p) const {
    auto a = reinterpret_cast<std::uintptr_t>(p);
    return a >= base_ && a < base_ + size_;
  }

private:
  device_address_space() {
    void* at = mmap(nullptr, size_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (at == MAP_FAILED)
      throw std::runtime_error("checked_backend: cannot reserve device address space");
    base_ = reinterpret_cast<std::uintptr_t>(at);
  }
  static constexpr std::size_t size_ = std::size_t{64} << 30;
  std::uintptr_t base_ = 0;
  std::atomic<std::size_t> next_{0};
};

class checked_backend final : public gpu::backend {
public:
  explicit checked_backend(std::size_t num_threads = 1, std::string label = "checked")
      : state_(std::make_shared<state>()), inner_(num_threads), label_(std::move(label)) {}

  // Kind cuda: it stands in for a device whose memory is not the host's (cpu backends do not
  // share memory with it). It is not a cuda::cuda_backend, so nothing may static_cast it.
  gpu::backend_kind kind() const override { return gpu::backend_kind::cuda; }
  std::string name() const override { return label_ + " (cpu kernels, device memory apart)"; }
  bool shares_memory_with(const gpu::backend& other) const override {
    auto* checked = dynamic_cast<const checked_backend*>(&other);
    return checked && checked->state_ == state_;
  }

  // The first violation of the memory rule (or the failure fail_after_operations planted),
  // naming the operation and argument; empty if none.
  std::string violation() const {
    std::lock_guard<std::mutex> guard{state_->mutex};
    return state_->error;
  }
  // The seam's sticky error, as the cuda backend reports a failed CUDA call.
  status error() const override {
    std::string v = violation();
    return v.empty() ? status::success() : status{make_error(error_code::device_error, v)};
  }
  // Stands in for a CUDA error: operation number `count` (1-based, counting every operation
  // of this backend) fails with `why`, and every later one is skipped.
  void fail_after_operations(std::uint64_t count, std::string why) {
    std::lock_guard<std::mutex> guard{state_->mutex};
    state_->fail_at = count;
    state_->fail_why = std::move(why);
  }
  std::uint64_t operations() const { return state_->operations; }
  std::uint64_t uploads() const { return state_->uploads; }
  std::uint64_t downloads() const { return state_->downloads; }
  // Bytes allocated and not yet freed (buffers, not matrices).
  std::size_t live_bytes() const {
    std::lock_guard<std::mutex> guard{state_->mutex};
    std::size_t total = 0;
    for (const auto& [at, a] : state_->live)
      total += a.num_bytes;
    return total;
  }
  // Bytes of the matrices uploaded here and still alive.
  std::size_t matrix_bytes() const {
    std::lock_guard<std::mutex> guard{state_->mutex};
    return state_->matrix_bytes;
  }

  // -- memory ------------------------------------------------------------------------------

  gpu::buffer allocate(std::size_t num_bytes) override {
    std::uintptr_t at = device_address_space::instance().take(num_bytes);
    {
      std::lock_guard<std::mutex> guard{state_->mutex};
      state_->live.emplace(at, allocation{num_bytes, std::make_unique<std::byte[]>(num_bytes + 64)});
    }
    std::shared_ptr<state> owner = state_;  // a buffer may outlive its backend
    std::shared_ptr<void> memory{reinterpret_cast<void*>(at), [owner](void* p) {
                                   std::lock_guard<std::mutex> guard{owner->mutex};
                                   owner->live.erase(reinterpret_cast<std::uintptr_t>(p));
                                 }};
    return gpu::buffer{std::move(memory), num_bytes, gpu::backend_kind::cuda};
  }
  void upload(void* dst, const void* src_host, std::size_t num_bytes) override {
    if (!ok("upload"))
      return;
    void* d = device("upload", "dst", dst, num_bytes);
    const void* s = host("upload", "src_host", src_host);
    ++state_->uploads;
    if (d && s && num_bytes)
      std::memcpy(d, s, num_bytes);
  }
  void download(void* dst_host, const void* src, std::size_t num_bytes) override {
    if (!ok("download"))
      return;
    void* d = host("download", "dst_host", dst_host);
    const void* s = device("download", "src", src, num_bytes);
    ++state_->downloads;
    if (d && s && num_bytes)
      std::memcpy(d, s, num_bytes);
  }
  void copy(void* dst, const void* src, std::size_t num_bytes) override {
    if (!ok("copy"))
      return;
    void* d = device("copy", "dst", dst, num_bytes);
    const void* s = device("copy", "src", src, num_bytes);
    if (d && s && num_bytes)
      std::memcpy(d, s, num_bytes);
  }
  result<gpu::matrix> upload_matrix(dtype type, std::size_t cols, std::span<const gpu::matrix_part> parts) override {
    for (const gpu::matrix_part& part : parts)
      if (!host("upload_matrix", "parts[].data", part.data))
        return make_error(error_code::invalid_argument, violation());
    auto m = inner_.upload_matrix(type, cols, parts);
    if (m && !m->empty()) {
      std::lock_guard<std::mutex> guard{state_->mutex};
      state_->matrices.insert(m->storage());
      state_->matrix_bytes += m->num_bytes();
    }
    return m;
  }

  // -- operations ----------------------------------------------------------------------------

  void matmul(const float* x, std::size_t num_rows, const gpu::matrix& w, float* y, const float* bias) override {
    if (!ok("matmul") || !mine("matmul", w))
      return;
    auto xs = in("matmul", "x", x);
    auto ys = out("matmul", "y", y);
    auto bs = bias ? in("matmul", "bias", bias) : nullptr;
    if (xs && ys && (bs || !bias))
      inner_.matmul(xs, num_rows, w, ys, bs);
  }
  void rms_norm(const float* x, std::size_t num_rows, std::size_t dim, std::size_t row_stride, const float* weight,
                float eps, float* out_) override {
    if (!ok("rms_norm"))
      return;
    auto xs = in("rms_norm", "x", x);
    auto ws = in("rms_norm", "weight", weight);
    auto os = out("rms_norm", "out", out_);
    if (xs && ws && os)
      inner_.rms_norm(xs, num_rows, dim, row_stride, ws, eps, os);
  }
  void rope(float* x, std::size_t num_rows, std::size_t row_stride, std::size_t num_heads, std::size_t head_stride,
            std::size_t dim, gpu::rope_style style, const float* table_host,
            const std::size_t* positions_host) override {
    if (!ok("rope"))
      return;
    auto xs = out("rope", "x", x);
    bool hosts = host("rope", "table_host", table_host) && host("rope", "positions_host", positions_host);
    if (xs && hosts)
      inner_.rope(xs, num_rows, row_stride, num_heads, head_stride, dim, style, table_host, positions_host);
  }
  void attention(const float* q, std::span<const gpu::kv_rows> rows_host, const gpu::attention_shape& shape,
                 float* out_) override {
    if (!ok("attention"))
      return;
    std::vector<gpu::kv_rows> rows;
    if (!kv("attention", rows_host, rows, true))
      return;
    auto qs = in("attention", "q", q);
    auto os = out("attention", "out", out_);
    if (qs && os)
      inner_.attention(qs, rows, shape, os);
  }
  void mla_attention(const float* q, std::span<const gpu::kv_rows> rows_host, const gpu::mla_shape& shape,
                     float* out_) override {
    if (!ok("mla_attention"))
      return;
    std::vector<gpu::kv_rows> rows;
    if (!kv("mla_attention", rows_host, rows, false))
      return;
    auto qs = in("mla_attention", "q", q);
    auto os = out("mla_attention", "out", out_);
    if (qs && os)
      inner_.mla_attention(qs, rows, shape, os);
  }
  void route(float* logits, std::size_t num_rows, const gpu::route_params& p, gpu::routed_slot* routes_host) override {
    if (!ok("route"))
      return;
    auto ls = out("route", "logits", logits);
    if (ls && host("route", "routes_host", routes_host))
      inner_.route(ls, num_rows, p, routes_host);
  }
  void swiglu(const float* gate_up, std::size_t num_rows, std::size_t dim, float* out_) override {
    if (!ok("swiglu"))
      return;
    auto gs = in("swiglu", "gate_up", gate_up);
    auto os = out("swiglu", "out", out_);
    if (gs && os)
      inner_.swiglu(gs, num_rows, dim, os);
  }
  void sigmoid_gate(const float* gate, std::size_t num_rows, std::size_t dim, float* x) override {
    if (!ok("sigmoid_gate"))
      return;
    auto gs = in("sigmoid_gate", "gate", gate);
    auto xs = out("sigmoid_gate", "x", x);
    if (gs && xs)
      inner_.sigmoid_gate(gs, num_rows, dim, xs);
  }
  void add(float* x, const float* y, std::size_t count) override {
    if (!ok("add"))
      return;
    auto xs = out("add", "x", x);
    auto ys = in("add", "y", y);
    if (xs && ys)
      inner_.add(xs, ys, count);
  }
  void gather_rows(const float* const* src_rows_host, std::size_t num_rows, std::size_t dim, float* dst) override {
    if (!ok("gather_rows") || !host("gather_rows", "src_rows_host", src_rows_host))
      return;
    std::vector<const float*> src(num_rows);
    for (std::size_t r = 0; r < num_rows; ++r)
      if (!(src[r] = in("gather_rows", "src_rows_host[r]", src_rows_host[r])))
        return;
    auto ds = out("gather_rows", "dst", dst);
    if (ds)
      inner_.gather_rows(src.data(), num_rows, dim, ds);
  }
  void scatter_rows(const float* src, std::size_t src_stride, std::size_t num_rows, std::size_t dim,
                    float* const* dst_rows_host) override {
    if (!ok("scatter_rows") || !host("scatter_rows", "dst_rows_host", dst_rows_host))
      return;
    std::vector<float*> dst(num_rows);
    for (std::size_t r = 0; r < num_rows; ++r)
      if (!(dst[r] = out("scatter_rows", "dst_rows_host[r]", dst_rows_host[r])))
        return;
    auto ss = in("scatter_rows", "src", src);
    if (ss)
      inner_.scatter_rows(ss, src_stride, num_rows, dim, dst.data());
  }
  void copy_rows(const float* src, std::size_t src_stride, float* dst, std::size_t dst_stride, std::size_t num_rows,
                 std::size_t dim) override {
    if (!ok("copy_rows"))
      return;
    auto ss = in("copy_rows", "src", src);
    auto ds = out("copy_rows", "dst", dst);
    if (ss && ds)
      inner_.copy_rows(ss, src_stride, ds, dst_stride, num_rows, dim);
  }
  void weight_rows(const float* x, std::size_t num_rows, std::size_t dim, const float* weights_host,
                   float* const* out_rows_host) override {
    if (!ok("weight_rows") || !host("weight_rows", "weights_host", weights_host) ||
        !host("weight_rows", "out_rows_host", out_rows_host))
      return;
    std::vector<float*> outs(num_rows);
    for (std::size_t r = 0; r < num_rows; ++r)
      if (!(outs[r] = out("weight_rows", "out_rows_host[r]", out_rows_host[r])))
        return;
    auto xs = in("weight_rows", "x", x);
    if (xs)
      inner_.weight_rows(xs, num_rows, dim, weights_host, outs.data());
  }
  void combine(const float* const* weighted_host, std::size_t top_k, const float* side, std::size_t num_rows,
               std::size_t dim, float* x) override {
    if (!ok("combine") || (num_rows * top_k > 0 && !host("combine", "weighted_host", weighted_host)))
      return;
    std::vector<const float*> weighted(num_rows * top_k);
    for (std::size_t i = 0; i < weighted.size(); ++i)
      if (!(weighted[i] = in("combine", "weighted_host[i]", weighted_host[i])))
        return;
    auto ss = side ? in("combine", "side", side) : nullptr;
    auto xs = out("combine", "x", x);
    if (xs && (ss || !side))
      inner_.combine(weighted.data(), top_k, ss, num_rows, dim, xs);
  }

  // One lane, this backend: its ranges run one after another (the cpu kernels' results do
  // not depend on how work is split, so the bits are those of the cpu backend).
  void concurrent(std::size_t num_tasks, std::size_t,
                  const std::function<void(gpu::backend& lane, std::size_t begin, std::size_t end)>& body) override {
    if (num_tasks > 0)
      body(*this, 0, num_tasks);
  }
  // As cuda: after a failure the completion is dropped; the device executor fails the task.
  void when_done(std::function<void()> callback) override {
    if (ok("when_done"))
      callback();
  }
  void synchronize() override {}

private:
  struct allocation {
    std::size_t num_bytes;
    std::unique_ptr<std::byte[]> shadow;
  };
  struct state {
    mutable std::mutex mutex;
    std::map<std::uintptr_t, allocation> live;  // by device address
    std::set<const gpu::matrix_storage*> matrices;
    std::size_t matrix_bytes = 0;
    std::string error;
    std::uint64_t fail_at = 0;  // 0: never
    std::string fail_why;
    std::atomic<std::uint64_t> operations{0}, uploads{0}, downloads{0};
  };

  bool ok(const char* op) {
    std::uint64_t n = ++state_->operations;
    std::lock_guard<std::mutex> guard{state_->mutex};
    if (state_->error.empty() && state_->fail_at != 0 && n >= state_->fail_at)
      state_->error = label_ + ": " + op + ": " + state_->fail_why;
    return state_->error.empty();
  }
  void fail(const std::string& why) {
    std::lock_guard<std::mutex> guard{state_->mutex};
    if (state_->error.empty())
      state_->error = label_ + ": " + why;
  }
  static std::string address(const void* p) {
    std::ostringstream s;
    s << p;
    return s.str();
  }
  // The shadow bytes behind device address `p` (which must lie in a live buffer of this
  // backend, with `num_bytes` after it when that is known), else null and the error recorded.
  void* device(const char* op, const char* arg, const void* p, std::size_t num_bytes = 0) {
    auto a = reinterpret_cast<std::uintptr_t>(p);
    {
      std::lock_guard<std::mutex> guard{state_->mutex};
      auto it = state_->live.upper_bound(a);
      if (it != state_->live.begin()) {
        --it;
        std::size_t offset = a - it->first;
        if (offset + num_bytes <= it->second.num_bytes && (offset < it->second.num_bytes || num_bytes == 0))
          return it->second.shadow.get() + offset;
      }
    }
    bool elsewhere = device_address_space::instance().contains(p);
    fail(std::string(op) + ": argument '" + arg + "' (" + address(p) + ") is " +
         (p == nullptr ? "null"
          : elsewhere  ? "device memory this backend did not allocate (another device's, or freed)"
                       : "host memory, not a buffer of this backend") +
         (num_bytes ? " (" + std::to_string(num_bytes) + " bytes)" : std::string{}));
    return nullptr;
  }
  const float* in(const char* op, const char* arg, const float* p) {
    return static_cast<const float*>(device(op, arg, p));
  }
  float* out(const char* op, const char* arg, float* p) { return static_cast<float*>(device(op, arg, p)); }
  template <typename T>
  T* host(const char* op, const char* arg, T* p) {
    if (p != nullptr && !device_address_space::instance().contains(p))
      return p;
    fail(std::string(op) + ": argument '" + arg + "' (" + address(p) + ") must be host memory, but is " +
         (p == nullptr ? "null" : "device memory"));
    return nullptr;
  }
  bool mine(const char* op, const gpu::matrix& w) {
    {
      std::lock_guard<std::mutex> guard{state_->mutex};
      if (state_->matrices.count(w.storage()))
        return true;
    }
    fail(std::string(op) + ": a " + std::to_string(w.rows()) + " x " + std::to_string(w.cols()) +
         " matrix this backend did not upload" + (w.empty() ? " (empty: not loaded on this device)" : ""));
    return false;
  }
  bool kv(const char* op, std::span<const gpu::kv_rows> rows_host, std::vector<gpu::kv_rows>& rows, bool values) {
    rows.resize(rows_host.size());
    for (std::size_t r = 0; r < rows_host.size(); ++r) {
      rows[r].num_positions = rows_host[r].num_positions;
      if (!(rows[r].keys = in(op, "rows_host[r].keys", rows_host[r].keys)))
        return false;
      rows[r].values = nullptr;
      if (values && !(rows[r].values = in(op, "rows_host[r].values", rows_host[r].values)))
        return false;
    }
    return true;
  }

  std::shared_ptr<state> state_;
  cpu::cpu_backend inner_;
  std::string label_;
};

}  // namespace moert::test
