#pragma once

// The CUDA device layer: finding a GPU, device memory, and the per-executor context (one
// device, one stream, one cuBLAS handle).
//
// "No GPU" is an ordinary error, never a crash: device_count() fails with the CUDA runtime's
// own reason (no driver: "CUDA driver version is insufficient for CUDA runtime version";
// no device: "no CUDA-capable device is detected"), and so does every constructor below.
//
// Thread safety: a context belongs to one device executor (one thread issues its work); its
// stream orders everything issued through it. device_buffer is move-only; it frees its memory
// on the device it was allocated on.

#include "core/error.hpp"

#include <cstddef>
#include <memory>
#include <mutex>
#include <string>

// Forward declarations keep cuda_runtime.h and cublas_v2.h out of callers that only hold a
// context (the runtime and the CLI).
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
typedef struct cublasContext* cublasHandle_t;

namespace moert::cuda {

// Number of usable CUDA devices; an error (error_code::device_error) naming the CUDA reason
// when there is no driver or no device, so "--backend cuda" on a machine without a GPU is one
// clear line.
result<int> device_count();

// "NVIDIA H200, compute 9.0, 139.8 GiB" for device `device_idx`, or the error.
result<std::string> describe_device(int device_idx);

// Device memory, `bytes` long, on the device that was current when it was allocated.
class device_buffer {
public:
  device_buffer() = default;
  static result<device_buffer> allocate(int device_idx, std::size_t bytes);
  device_buffer(device_buffer&& other) noexcept;
  device_buffer& operator=(device_buffer&& other) noexcept;
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer();

  void* data() const { return data_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  std::size_t size() const { return bytes_; }
  int device() const { return device_idx_; }
  bool empty() const { return data_ == nullptr; }

private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  int device_idx_ = -1;
};

// One device executor's CUDA state: the device, its stream, a cuBLAS handle bound to that
// stream, and scratch memory that grows to the largest request and is reused (nothing is
// allocated per token once warm). Work issued through a context is asynchronous; synchronize()
// waits for it with a timeout.
class context {
public:
  // Selects `device_idx`, creates a non-blocking stream and a cuBLAS handle on it. Fails with
  // device_error when the device does not exist or CUDA cannot start.
  static result<std::unique_ptr<context>> create(int device_idx);
  ~context();
  context(const context&) = delete;
  context& operator=(const context&) = delete;

  int device() const { return device_idx_; }
  cudaStream_t stream() const { return stream_; }
  cublasHandle_t cublas() const { return cublas_; }

  // Makes this context's device current on the calling thread (CUDA's current device is per
  // thread; an executor calls this once when it starts, every public entry point re-checks).
  status make_current() const;

  // Scratch slot `slot` (0..num_scratch-1) with at least `bytes`; valid until the next call for
  // the same slot. Callers use distinct slots for buffers that are live at the same time.
  static constexpr int num_scratch = 6;
  result<void*> scratch(int slot, std::size_t bytes);

  // Host → device and device → host copies ordered on the stream. The host side of an upload
  // may be reused when the call returns (pageable memory is staged); a download is complete
  // only after synchronize().
  status upload(void* device_dst, const void* host_src, std::size_t bytes);
  status download(void* host_dst, const void* device_src, std::size_t bytes);
  status copy_device(void* dst, const void* src, std::size_t bytes);

  // Copies `bytes` of host memory into a device staging area in stream order and returns its
  // device address, valid for work issued after this call until the area is reused
  // (num_staging_slots stagings later). The host bytes may be reused as soon as this returns:
  // they go through pinned memory, and a slot waits for its previous copy before refilling.
  // For small per-call parameters (pointer arrays, positions, routing weights). Thread-safe.
  static constexpr std::size_t num_staging_slots = 16;
  result<void*> stage(const void* host, std::size_t bytes);
  // stage() and a device copy to `device_dst`, enqueued together (an upload whose host bytes
  // may die at return, from any thread).
  status upload_staged(void* device_dst, const void* host, std::size_t bytes);

  // Waits until all work issued on the stream has finished, polling every 50 µs at most
  // `timeout_ms`; a kernel fault or a timeout is an error naming the device.
  status synchronize(double timeout_ms = 60'000.0);

private:
  explicit context(int device_idx) : device_idx_(device_idx) {}
  int device_idx_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  device_buffer cublas_workspace_;
  device_buffer scratch_[num_scratch];
  struct staging_slot {
    void* pinned = nullptr;
    std::size_t capacity = 0;
    device_buffer device;
    cudaEvent_t done = nullptr;  // the slot's last host→device copy
  };
  std::recursive_mutex staging_mutex_;  // memory functions (uploads) may come from any thread
  staging_slot staging_[num_staging_slots];
  std::size_t next_slot_ = 0;
};

}  // namespace moert::cuda
