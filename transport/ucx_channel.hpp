#pragma once

// Tensor bytes between processes over UCX 1.13 tag messaging (tcp, or posix shared memory on
// one machine). The control plane (CAF) carries a descriptor {tag, bytes}; the bytes travel
// here. One channel per process: it owns a UCP context, one worker and the thread that
// drives it, so no actor ever blocks on UCX. Completions arrive as callbacks on that thread:
// keep them short (post a CAF message and return).
//
// Bounds (untrusted peers): a receive's size is the descriptor's, checked against
// `max_message_bytes` and against the pool's free bytes before anything is allocated; every
// send and receive has a deadline, past which it is cancelled (UCX itself never notices a
// crashed peer in posix mode); cancel_peer() fails everything pending with a peer.
//
// Thread safety: every public member may be called from any thread. Callbacks run on the
// channel's thread, never inside the caller's call.

#include "core/error.hpp"

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace moert::transport {

enum class ucx_transport { tcp, posix };
const char* to_string(ucx_transport transport);

struct ucx_channel_config {
  ucx_transport transport = ucx_transport::tcp;
  std::size_t max_message_bytes = std::size_t{64} << 20;  // one tensor message
  std::size_t pool_bytes = std::size_t{256} << 20;        // receive bytes outstanding at once
  std::chrono::milliseconds default_timeout{5000};
};

using peer_id = std::uint64_t;

// Received bytes; destroying it returns its bytes to the channel's pool (the credit that
// bounds how much a peer can make this process hold).
class received_buffer {
public:
  received_buffer() = default;
  received_buffer(std::vector<std::uint8_t> bytes, std::shared_ptr<void> credit)
      : bytes_(std::move(bytes)), credit_(std::move(credit)) {}
  const std::vector<std::uint8_t>& bytes() const { return bytes_; }
  std::vector<std::uint8_t>& bytes() { return bytes_; }

private:
  std::vector<std::uint8_t> bytes_;
  std::shared_ptr<void> credit_;
};

class ucx_channel {
public:
  using send_done = std::function<void(status)>;
  using receive_done = std::function<void(result<received_buffer>)>;

  static result<std::unique_ptr<ucx_channel>> create(ucx_channel_config config);
  ~ucx_channel();  // cancels what is pending (callbacks get an error), then joins

  ucx_channel(const ucx_channel&) = delete;
  ucx_channel& operator=(const ucx_channel&) = delete;

  // This worker's address: opaque bytes for the peer's connect(), sent through CAF after
  // the handshake.
  const std::string& address() const { return address_; }

  // Creates an endpoint to a peer's worker address (size-checked before use).
  result<peer_id> connect(const std::string& peer_address);

  // Sends `bytes` (kept alive until done) with `tag`; `done` gets success or the error.
  void send(peer_id peer, std::uint64_t tag, std::shared_ptr<const std::vector<std::uint8_t>> bytes,
            send_done done, std::chrono::milliseconds timeout = std::chrono::milliseconds{0});
  // Receives exactly `bytes` announced for `tag` (from `peer`, whose pending receives
  // cancel_peer() fails). Refused at once: bytes over max_message_bytes or over the pool.
  void receive(peer_id peer, std::uint64_t tag, std::size_t bytes, receive_done done,
               std::chrono::milliseconds timeout = std::chrono::milliseconds{0});
  // Fails every pending send and receive with `peer` (its node was found dead).
  void cancel_peer(peer_id peer, std::string reason);

  std::size_t pool_bytes_in_use() const;
  const ucx_channel_config& config() const { return config_; }

  struct impl;

private:
  explicit ucx_channel(std::unique_ptr<impl> state);
  std::unique_ptr<impl> impl_;
  std::string address_;
  ucx_channel_config config_;
};

}  // namespace moert::transport
