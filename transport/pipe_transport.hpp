#pragma once

// One-way byte pipes between two processes, each message matched by (pipe, sequence number):
// what actors/tensor_link needs from the GPU row path (cluster transport "nccl"), apart from
// NCCL itself. The product's implementation is NCCL's (make_nccl_pipes in
// transport/nccl_channel.hpp: host bytes staged through device memory, ncclSend / ncclRecv on
// the channel's stream); make_loopback_pipes is an in-process stand-in with the same ordering
// and timeout rules, so tensor_link's descriptor and sequence logic is tested without a GPU.
//
// Bring-up: the sending side makes a key (make_key: an ncclUniqueId for NCCL), it reaches the
// receiving side through CAF control, and each side opens its end with it.
//
// Ordering: send() hands out the message's sequence number (0, 1, ...), which travels in the
// descriptor; receive() may be called in any order (CAF orders messages per actor pair, not per
// process pair): the receives are issued in sequence order, a receive ahead of its turn waits
// for the ones before it. Every transfer has a deadline; one that passes it fails the pipe and
// every transfer on it (a pipe that lost a message cannot be resynchronised).
//
// Thread safety: every member may be called from any thread. Callbacks run on a thread of the
// implementation, never inside the caller's call: keep them short (post a CAF message).

#include "core/error.hpp"

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace moert::transport {

// A pipe's key, as it travels through CAF (NCCL_UNIQUE_ID_BYTES for NCCL).
using pipe_key = std::array<std::uint8_t, 128>;
using pipe_id = std::uint64_t;

class pipe_transport {
public:
  using done = std::function<void(status)>;
  virtual ~pipe_transport() = default;

  // "nccl on CUDA device 0", "loopback": for messages.
  virtual std::string name() const = 0;
  // A fresh key for one pipe, made by its sending side.
  virtual result<pipe_key> make_key() = 0;
  virtual result<pipe_id> open_send(const pipe_key& key) = 0;
  virtual result<pipe_id> open_receive(const pipe_key& key) = 0;

  // Sends the host bytes `bytes` (kept alive until `finished` has run) and returns their
  // sequence number on the pipe; an error at once when the pipe cannot send (not a sending
  // pipe, or failed).
  virtual result<std::uint64_t> send(pipe_id pipe, std::shared_ptr<const std::vector<std::uint8_t>> bytes,
                                     done finished) = 0;
  // Receives message `sequence` of the pipe, exactly `num_bytes` (the descriptor's), into host
  // memory at `dest` (valid until `finished` has run).
  virtual void receive(pipe_id pipe, std::uint64_t sequence, void* dest, std::size_t num_bytes, done finished) = 0;
  // Fails every pending transfer of the pipe with `reason` (its peer was lost).
  virtual void cancel(pipe_id pipe, std::string reason) = 0;
};

// In-process pipes (both ends in this process, keys known to this object only), with the
// ordering and deadline rules above: for tests of what drives pipes. A message a receive asks
// for with other bytes than were sent fails that pipe.
std::unique_ptr<pipe_transport> make_loopback_pipes(std::chrono::milliseconds timeout);

}  // namespace moert::transport
