#include "gpu/registry.hpp"

#include "gpu/cpu/backend.hpp"

namespace moert::gpu {

std::vector<backend_info> compiled_backends() {
  std::vector<backend_info> out;
  out.push_back({backend_kind::cpu, true, 1, {}});
#if MOERT_HAVE_CUDA
  backend_info cuda;
  cuda.kind = backend_kind::cuda;
  cuda.num_devices = moert::cuda::device_count(cuda.reason);
  cuda.usable = cuda.num_devices > 0;
  out.push_back(std::move(cuda));
#endif
  return out;
}

std::vector<backend_kind> available_backends() {
  std::vector<backend_kind> out;
  for (const backend_info& info : compiled_backends())
    if (info.usable)
      out.push_back(info.kind);
  return out;
}

result<std::unique_ptr<backend>> create_backend(backend_kind kind, const backend_options& options) {
  if (kind == backend_kind::cpu)
    return std::unique_ptr<backend>(std::make_unique<cpu::cpu_backend>(options.num_threads));
#if MOERT_HAVE_CUDA
  return moert::cuda::create_backend(options);
#else
  return make_error(error_code::unsupported, std::string("backend '") + to_string(kind) +
                                                 "' is not compiled into this build (configure with CUDA found)");
#endif
}

backend& host_backend() {
  static cpu::cpu_backend host{std::size_t{1}};
  return host;
}

}  // namespace moert::gpu
