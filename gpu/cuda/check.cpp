#include "gpu/cuda/check.hpp"

#include <string>

namespace moert::cuda {

namespace {

// Paths relative to the repository root read better in a one-line error.
const char* short_path(const char* file) {
  std::string_view f{file};
  for (std::string_view root : {"/gpu/", "/tests/", "/bench/"}) {
    auto at = f.rfind(root);
    if (at != std::string_view::npos)
      return file + at + 1;
  }
  return file;
}

}  // namespace

status cuda_failure(cudaError_t rc, const char* call, const char* file, int line) {
  return make_error(error_code::device_error, std::string{call} + " failed at " + short_path(file) + ":" +
                                                  std::to_string(line) + ": " + cudaGetErrorString(rc) + " (" +
                                                  cudaGetErrorName(rc) + ")");
}

status cublas_failure(cublasStatus_t rc, const char* call, const char* file, int line) {
  return make_error(error_code::device_error, std::string{call} + " failed at " + short_path(file) + ":" +
                                                  std::to_string(line) + ": " + cublasGetStatusString(rc) +
                                                  " (" + cublasGetStatusName(rc) + ")");
}

}  // namespace moert::cuda
