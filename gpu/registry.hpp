#pragma once

// Which backends this build has and how to make one. Whoever owns a device (actors/device,
// the reference forward's caller, a test) creates its backend here; model/ never names a
// concrete backend.
//
// A backend other than cpu plugs in by providing, in its own folder, the two functions the
// registry calls (declared below; gpu/cuda implements them when MOERT_HAVE_CUDA is set):
//   std::size_t moert::cuda::device_count(std::string& why_none);
//   result<std::unique_ptr<gpu::backend>> moert::cuda::create_backend(const gpu::backend_options&);
//
// Thread safety: every function may be called from any thread.

#include "core/error.hpp"
#include "gpu/backend.hpp"

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace moert::gpu {

// The grouped/dense switch of a device's expert GEMMs (EPS-MoE), as `moert calibrate --backend
// cuda` measured it and the testbed file carries it. Backends that have one switch (cuda) start
// with it; the cpu backend has none (its expert GEMMs are one path, bit-identical).
struct gemm_calibration {
  bool calibrated = false;  // false: the backend's uncalibrated default (it says so)
  // An expert with at least this many rows runs as its own dense GEMM, fewer share a grouped
  // one; unset (when calibrated): dense never won, every expert runs grouped.
  std::optional<std::size_t> dense_min_rows;
  std::string source;  // what it was measured on
};

struct backend_options {
  // cpu: threads of the kernels' pool, counting the calling (device) thread; 1 runs inline.
  std::size_t num_threads = 1;
  // cuda: which visible GPU.
  std::size_t device_index = 0;
  // cuda: the expert GEMM switch it starts with.
  gemm_calibration expert_gemm;

  static backend_options with_threads(std::size_t num_threads) {
    backend_options out;
    out.num_threads = num_threads;
    return out;
  }
};

struct backend_info {
  backend_kind kind;
  bool usable = false;          // compiled in and a device is present
  std::size_t num_devices = 0;  // cpu: 1
  std::string reason;           // why not usable ("no CUDA device visible"), else empty
};

// Every backend compiled into this build, cpu first, each saying whether it can run here.
std::vector<backend_info> compiled_backends();
// The usable ones only (what a test parametrised over "every backend" iterates).
std::vector<backend_kind> available_backends();

// A new backend of `kind`; an error names why it cannot be made (not compiled in, no device,
// device index out of range).
result<std::unique_ptr<backend>> create_backend(backend_kind kind, const backend_options& options = {});

// A process-wide single-threaded cpu backend for host memory: the default home of weights and
// caches when the caller names no backend. Its operations run inline on the calling thread,
// so unlike other backends it may be used by several threads at once.
backend& host_backend();

// For tests: from now on create_backend(kind) calls `factory` instead, and compiled_backends()
// reports `kind` usable, until it is called again with a null factory.
// This is how a test runs the engine's non-host data path on a stand-in backend where no GPU
// is present (tests/gpu/checked_backend.hpp). Not for the product.
using backend_factory = std::function<result<std::unique_ptr<backend>>(const backend_options&)>;
void override_backend_for_tests(backend_kind kind, backend_factory factory);

// True when `b`'s memory is host memory (it shares memory with host_backend()): host vectors
// serve it directly. Otherwise host rows must be uploaded and downloaded around its steps.
inline bool holds_host_memory(const backend& b) { return b.shares_memory_with(host_backend()); }

}  // namespace moert::gpu

namespace moert::cuda {
std::size_t device_count(std::string& why_none);
result<std::unique_ptr<gpu::backend>> create_backend(const gpu::backend_options& options);
}  // namespace moert::cuda
