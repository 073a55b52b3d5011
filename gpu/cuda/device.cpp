#include "gpu/cuda/device.hpp"

#include "gpu/cuda/check.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cstdio>
#include <thread>

namespace moert::cuda {

result<int> device_count() {
  int count = 0;
  cudaError_t rc = cudaGetDeviceCount(&count);
  if (rc != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" state for later calls
    return make_error(error_code::device_error, std::string{"no CUDA device: cudaGetDeviceCount: "} +
                                                    cudaGetErrorString(rc) + " (" + cudaGetErrorName(rc) + ")");
  }
  if (count == 0)
    return make_error(error_code::device_error, "no CUDA device: cudaGetDeviceCount found 0 devices");
  return count;
}

namespace {

status check_index(int device_idx) {
  auto count = device_count();
  if (!count)
    return count.err();
  if (device_idx < 0 || device_idx >= *count)
    return make_error(error_code::device_error, "CUDA device " + std::to_string(device_idx) +
                                                    " does not exist (this machine has " +
                                                    std::to_string(*count) + ")");
  return {};
}

}  // namespace

result<std::string> describe_device(int device_idx) {
  MOERT_TRY(check_index(device_idx));
  cudaDeviceProp prop{};
  MOERT_CUDA_TRY(cudaGetDeviceProperties(&prop, device_idx));
  char text[640];
  std::snprintf(text, sizeof text, "%s, compute %d.%d, %.1f GiB, %d SMs", prop.name, prop.major, prop.minor,
                double(prop.totalGlobalMem) / double(1ull << 30), prop.multiProcessorCount);
  return std::string{text};
}

// -- device_buffer ------------------------------------------------------------------------------

result<device_buffer> device_buffer::allocate(int device_idx, std::size_t bytes) {
  MOERT_CUDA_TRY(cudaSetDevice(device_idx));
  device_buffer out;
  out.device_idx_ = device_idx;
  if (bytes == 0)
    return out;
  void* ptr = nullptr;
  cudaError_t rc = cudaMalloc(&ptr, bytes);
  if (rc != cudaSuccess)
    return make_error(error_code::device_error, "cudaMalloc of " + std::to_string(bytes) + " bytes on device " +
                                                    std::to_string(device_idx) + " failed: " +
                                                    cudaGetErrorString(rc));
  out.data_ = ptr;
  out.bytes_ = bytes;
  return out;
}

device_buffer::device_buffer(device_buffer&& other) noexcept
    : data_(other.data_), bytes_(other.bytes_), device_idx_(other.device_idx_) {
  other.data_ = nullptr;
  other.bytes_ = 0;
}

device_buffer& device_buffer::operator=(device_buffer&& other) noexcept {
  if (this != &other) {
    this->~device_buffer();
    data_ = other.data_;
    bytes_ = other.bytes_;
    device_idx_ = other.device_idx_;
    other.data_ = nullptr;
    other.bytes_ = 0;
  }
  return *this;
}

device_buffer::~device_buffer() {
  if (data_ == nullptr)
    return;
  // cudaFree synchronizes the device; the buffer's memory returns to the device it came from.
  int current = -1;
  cudaGetDevice(&current);
  if (current != device_idx_)
    cudaSetDevice(device_idx_);
  cudaFree(data_);
  if (current != device_idx_ && current >= 0)
    cudaSetDevice(current);
  data_ = nullptr;
}

// -- context -----------------------------------------------------------------------------------

result<std::unique_ptr<context>> context::create(int device_idx) {
  MOERT_TRY(check_index(device_idx));
  std::unique_ptr<context> ctx{new context(device_idx)};
  MOERT_CUDA_TRY(cudaSetDevice(device_idx));
  MOERT_CUDA_TRY(cudaStreamCreateWithFlags(&ctx->stream_, cudaStreamNonBlocking));
  MOERT_CUBLAS_TRY(cublasCreate(&ctx->cublas_));
  MOERT_CUBLAS_TRY(cublasSetStream(ctx->cublas_, ctx->stream_));
  // Plain f32 compute for f32 GEMMs: TF32 would miss the 1e-3 agreement with the CPU backend.
  MOERT_CUBLAS_TRY(cublasSetMathMode(ctx->cublas_, CUBLAS_DEFAULT_MATH));
  // A workspace of our own keeps cuBLAS from allocating inside calls (32 MiB is what NVIDIA
  // recommends for Hopper).
  constexpr std::size_t workspace_bytes = 32u << 20;
  auto ws = device_buffer::allocate(device_idx, workspace_bytes);
  if (!ws)
    return ws.err();
  ctx->cublas_workspace_ = std::move(*ws);
  MOERT_CUBLAS_TRY(cublasSetWorkspace(ctx->cublas_, ctx->cublas_workspace_.data(), workspace_bytes));
  for (staging_slot& slot : ctx->staging_)
    MOERT_CUDA_TRY(cudaEventCreateWithFlags(&slot.done, cudaEventDisableTiming));
  return ctx;
}

context::~context() {
  cudaSetDevice(device_idx_);
  if (stream_)
    cudaStreamSynchronize(stream_);
  for (staging_slot& slot : staging_) {
    if (slot.done)
      cudaEventDestroy(slot.done);
    if (slot.pinned)
      cudaFreeHost(slot.pinned);
  }
  if (cublas_)
    cublasDestroy(cublas_);
  if (stream_)
    cudaStreamDestroy(stream_);
}

status context::make_current() const {
  MOERT_CUDA_TRY(cudaSetDevice(device_idx_));
  return {};
}

result<void*> context::scratch(int slot, std::size_t bytes) {
  if (slot < 0 || slot >= num_scratch)
    return make_error(error_code::invalid_argument, "CUDA scratch slot " + std::to_string(slot) + " out of range");
  device_buffer& buf = scratch_[slot];
  if (buf.size() < bytes) {
    // Work already queued may still read the old buffer: wait before it is freed.
    MOERT_CUDA_TRY(cudaStreamSynchronize(stream_));
    buf = device_buffer{};
    auto grown = device_buffer::allocate(device_idx_, bytes + bytes / 4);
    if (!grown)
      return grown.err();
    buf = std::move(*grown);
  }
  return buf.data();
}

result<void*> context::stage(const void* host, std::size_t bytes) {
  std::lock_guard<std::recursive_mutex> lock{staging_mutex_};
  staging_slot& slot = staging_[next_slot_];
  next_slot_ = (next_slot_ + 1) % num_staging_slots;
  // The slot's pinned bytes may still be on their way to the device.
  MOERT_CUDA_TRY(cudaEventSynchronize(slot.done));
  if (slot.capacity < bytes) {
    std::size_t cap = std::max({bytes, 2 * slot.capacity, std::size_t{4096}});
    if (slot.pinned)
      cudaFreeHost(slot.pinned);
    slot.pinned = nullptr;
    slot.capacity = 0;
    slot.device = device_buffer{};  // cudaFree waits for kernels still reading the old area
    MOERT_CUDA_TRY(cudaMallocHost(&slot.pinned, cap));
    auto dev = device_buffer::allocate(device_idx_, cap);
    if (!dev)
      return dev.err();
    slot.device = std::move(*dev);
    slot.capacity = cap;
  }
  if (bytes != 0) {
    std::memcpy(slot.pinned, host, bytes);
    MOERT_CUDA_TRY(cudaMemcpyAsync(slot.device.data(), slot.pinned, bytes, cudaMemcpyHostToDevice, stream_));
    MOERT_CUDA_TRY(cudaEventRecord(slot.done, stream_));
  }
  return slot.device.data();
}

status context::upload_staged(void* device_dst, const void* host, std::size_t bytes) {
  std::lock_guard<std::recursive_mutex> lock{staging_mutex_};
  auto staged = stage(host, bytes);
  if (!staged)
    return staged.err();
  return copy_device(device_dst, *staged, bytes);
}

status context::upload(void* device_dst, const void* host_src, std::size_t bytes) {
  if (bytes == 0)
    return {};
  MOERT_CUDA_TRY(cudaMemcpyAsync(device_dst, host_src, bytes, cudaMemcpyHostToDevice, stream_));
  return {};
}

status context::download(void* host_dst, const void* device_src, std::size_t bytes) {
  if (bytes == 0)
    return {};
  MOERT_CUDA_TRY(cudaMemcpyAsync(host_dst, device_src, bytes, cudaMemcpyDeviceToHost, stream_));
  return {};
}

status context::copy_device(void* dst, const void* src, std::size_t bytes) {
  if (bytes == 0)
    return {};
  MOERT_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  return {};
}

status context::synchronize(double timeout_ms) {
  auto start = std::chrono::steady_clock::now();
  for (;;) {
    cudaError_t rc = cudaStreamQuery(stream_);
    if (rc == cudaSuccess)
      return {};
    if (rc != cudaErrorNotReady)
      return make_error(error_code::device_error, "work on CUDA device " + std::to_string(device_idx_) +
                                                      " failed: " + cudaGetErrorString(rc) + " (" +
                                                      cudaGetErrorName(rc) + ")");
    double waited = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (waited > timeout_ms)
      return make_error(error_code::device_error, "CUDA device " + std::to_string(device_idx_) +
                                                      " did not finish its stream within " +
                                                      std::to_string(int(timeout_ms)) + " ms");
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

}  // namespace moert::cuda
