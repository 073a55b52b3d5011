#pragma once

// GPU buffers between processes over NCCL 2.28 point-to-point (ncclSend / ncclRecv): the bytes
// go GPU to GPU (NVLink, PCIe P2P or the network NCCL picks), the control plane (CAF) carries a
// descriptor {pipe, sequence, bytes}. Built only with CUDA and NCCL (MOERT_HAVE_NCCL).
//
// One *pipe* per direction between two processes: a two-rank communicator whose rank 0 only
// sends and rank 1 only receives. NCCL runs the operations of one communicator in the order
// they were issued, so one communicator shared by both directions (or by several peers) can
// deadlock when two processes each wait in a send for the other's receive; a one-way pipe
// cannot. The receiver issues its receives in the sender's order, which is why send() hands
// out a sequence number that the descriptor carries: a receive that arrives ahead of its turn
// (CAF orders messages per actor pair, not per process pair) waits for the ones before it.
//
// Bring-up: the sending side makes an id (make_nccl_id), sends its 128 bytes to the peer
// through CAF control, and both call open_send / open_receive with it. NCCL's init is
// collective; here it does not block: the pipe becomes usable once both sides have joined
// (within init_timeout), and transfers posted earlier wait for it.
//
// Every transfer has a deadline. A transfer that passes it aborts the pipe's communicator
// (ncclCommAbort ends its kernels) and fails every transfer of that pipe: a pipe that lost a
// message cannot be resynchronised, the peer is treated as lost (cancel_peer does the same).
//
// Thread safety: every public member may be called from any thread. One thread per channel
// makes every NCCL and CUDA call of the channel (with the channel's device current) and runs
// the callbacks: keep them short (post a CAF message and return). Callbacks never run inside
// the caller's call.

#include "core/error.hpp"
#include "transport/pipe_transport.hpp"

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

struct CUevent_st;  // cudaEvent_t without <cuda_runtime.h> in this header

namespace moert::transport {

// An ncclUniqueId as bytes (NCCL_UNIQUE_ID_BYTES), the form it travels in through CAF.
using nccl_id = pipe_key;

// A fresh id for one pipe (ncclGetUniqueId: also works on a machine without a GPU).
[[nodiscard]] result<nccl_id> make_nccl_id();

struct nccl_channel_config {
  int device = 0;  // the CUDA device whose memory the transfers read and write
  std::chrono::milliseconds default_timeout{5000};
  std::chrono::milliseconds init_timeout{30000};  // both sides of a pipe joined
};

class nccl_channel {
public:
  using done = std::function<void(status)>;

  // Fails with error_code::device_error naming the device when there is no such CUDA device.
  static result<std::unique_ptr<nccl_channel>> create(nccl_channel_config config);
  ~nccl_channel();  // fails what is pending ("channel closed"), aborts the pipes, joins

  nccl_channel(const nccl_channel&) = delete;
  nccl_channel& operator=(const nccl_channel&) = delete;

  // This process sends on the pipe `id` names; the peer calls open_receive with the same id.
  result<pipe_id> open_send(const nccl_id& id);
  result<pipe_id> open_receive(const nccl_id& id);

  // Sends `bytes` from device memory at `data` (valid and unchanged until `finished` runs)
  // once `ready` has completed (an event the producer recorded on its stream; null: the
  // bytes are ready now). Returns the sequence number the descriptor must carry; an error at
  // once when `pipe` is not a sending pipe of this channel or has failed.
  result<std::uint64_t> send(pipe_id pipe, const void* data, std::size_t bytes, CUevent_st* ready,
                             done finished, std::chrono::milliseconds timeout = std::chrono::milliseconds{0});
  // Receives the message `sequence` of the pipe (exactly `bytes`, the descriptor's) into
  // device memory at `data`; `finished` runs once the bytes are there, visible to every
  // stream of the device. Receives are issued in sequence order, whatever order they come in.
  void receive(pipe_id pipe, std::uint64_t sequence, void* data, std::size_t bytes, done finished,
               std::chrono::milliseconds timeout = std::chrono::milliseconds{0});

  // The same with host memory at both ends (what tensor_link's rows are at the actor
  // boundary): the channel's thread stages the bytes through a device buffer of its own,
  // allocated and freed in stream order on the pipe's stream (cudaMallocAsync). A send copies
  // `host` up before its ncclSend (host must stay valid and unchanged until `finished`); a
  // receive copies down into `host` once its ncclRecv completed, on a copy stream of the pipe
  // that nothing else waits on, so a receive still waiting for its peer never holds the thread.
  result<std::uint64_t> send_host(pipe_id pipe, const void* host, std::size_t bytes, done finished,
                                  std::chrono::milliseconds timeout = std::chrono::milliseconds{0});
  void receive_host(pipe_id pipe, std::uint64_t sequence, void* host, std::size_t bytes, done finished,
                    std::chrono::milliseconds timeout = std::chrono::milliseconds{0});

  // Fails every pending transfer of the pipe with `reason` and aborts it (its peer was lost).
  void cancel_peer(pipe_id pipe, std::string reason);

  // Whether both sides have joined the pipe (false while initialising or after a failure).
  bool ready(pipe_id pipe) const;
  int device() const { return config_.device; }
  const nccl_channel_config& config() const { return config_; }

  struct impl;

private:
  result<std::uint64_t> post_send(pipe_id pipe, const void* data, bool on_host, std::size_t bytes, CUevent_st* ready,
                                  done finished, std::chrono::milliseconds timeout);
  void post_receive(pipe_id pipe, std::uint64_t sequence, void* data, bool on_host, std::size_t bytes, done finished,
                    std::chrono::milliseconds timeout);
  nccl_channel(std::unique_ptr<impl> state, nccl_channel_config config);
  std::unique_ptr<impl> impl_;
  nccl_channel_config config_;
};

// tensor_link's pipes (transport/pipe_transport.hpp) over one nccl_channel on
// `config.device`, host bytes staged (send_host / receive_host). Fails naming the device when
// there is no such CUDA device.
result<std::unique_ptr<pipe_transport>> make_nccl_pipes(nccl_channel_config config);

}  // namespace moert::transport
