#include "gpu/registry.hpp"

#include "gpu/cpu/backend.hpp"

#include <algorithm>
#include <mutex>

namespace moert::gpu {

namespace {

struct test_override {
  std::mutex mutex;
  backend_kind kind = backend_kind::cpu;
  backend_factory factory;  // null: none
};

test_override& overridden() {
  static test_override state;
  return state;
}

// The test factory for `kind`, or null.
backend_factory override_of(backend_kind kind) {
  test_override& o = overridden();
  std::lock_guard<std::mutex> guard{o.mutex};
  return o.factory && o.kind == kind ? o.factory : backend_factory{};
}

}  // namespace

void override_backend_for_tests(backend_kind kind, backend_factory factory) {
  test_override& o = overridden();
  std::lock_guard<std::mutex> guard{o.mutex};
  o.kind = kind;
  o.factory = std::move(factory);
}

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
  for (backend_kind kind : {backend_kind::cpu, backend_kind::cuda}) {
    if (!override_of(kind))
      continue;
    auto at = std::find_if(out.begin(), out.end(), [&](const backend_info& info) { return info.kind == kind; });
    if (at == out.end())
      at = out.insert(out.end(), backend_info{kind, false, 0, {}});
    *at = {kind, true, 1, {}};
  }
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
  if (backend_factory factory = override_of(kind))
    return factory(options);
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
