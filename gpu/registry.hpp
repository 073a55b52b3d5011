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

#include <memory>
#include <string>
#include <vector>

namespace moert::gpu {

struct backend_options {
  // cpu: threads of the kernels' pool, counting the calling (device) thread; 1 runs inline.
  std::size_t num_threads = 1;
  // cuda: which visible GPU.
  std::size_t device_index = 0;
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

}  // namespace moert::gpu

namespace moert::cuda {
std::size_t device_count(std::string& why_none);
result<std::unique_ptr<gpu::backend>> create_backend(const gpu::backend_options& options);
}  // namespace moert::cuda
