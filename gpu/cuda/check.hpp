#pragma once

// CUDA and cuBLAS return codes as moert::status. The message names the call as written at the
// call site, the file and line, and the library's own text, e.g.
//   "device error: cudaMalloc(&ptr, bytes) failed at gpu/cuda/device.cpp:40: out of memory (2)".
// Host-side only (plain C++ translation units); kernels report through cudaGetLastError.

#include "core/error.hpp"

#include <cublas_v2.h>
#include <cuda_runtime.h>

namespace moert::cuda {

status cuda_failure(cudaError_t rc, const char* call, const char* file, int line);
status cublas_failure(cublasStatus_t rc, const char* call, const char* file, int line);

inline status check_cuda(cudaError_t rc, const char* call, const char* file, int line) {
  return rc == cudaSuccess ? status::success() : cuda_failure(rc, call, file, line);
}
inline status check_cublas(cublasStatus_t rc, const char* call, const char* file, int line) {
  return rc == CUBLAS_STATUS_SUCCESS ? status::success() : cublas_failure(rc, call, file, line);
}

}  // namespace moert::cuda

// Returns a failed status from the enclosing function when the CUDA runtime call fails.
#define MOERT_CUDA_TRY(call) MOERT_TRY(::moert::cuda::check_cuda((call), #call, __FILE__, __LINE__))
// The same for cuBLAS calls.
#define MOERT_CUBLAS_TRY(call) MOERT_TRY(::moert::cuda::check_cublas((call), #call, __FILE__, __LINE__))
