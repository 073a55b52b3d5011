#pragma once

// Tensor bytes between processes over UCX 1.13 tag messaging (tcp, or posix shared memory on
// one machine). The control plane (CAF) carries a descriptor {tag, bytes}; the bytes travel
// here. One channel per process: it owns a UCP context, one worker and a thread that drives
// the worker while transfers are pending (short polls, then event-fd sleeps). While nothing is
// pending it sleeps unarmed: an arriving message wakes nobody and waits in UCX until its
// receive is posted, and that call progresses the worker itself.
//
// The caller's thread starts its own transfer: send() and receive_into() call UCX directly
// (under the channel's lock) instead of handing the request to the channel thread, so a
// message that fits UCX's eager path (config.eager_limit_bytes) costs no thread hand-off at
// either end: the send completes inside the call, and a receive posted after the bytes
// arrived completes inside the call too (receive_into() returns `true`). Everything that
// does not finish at once is finished by the channel thread.
//
// Bounds (untrusted peers): a receive's size is the descriptor's, checked against
// `max_message_bytes` and against the pool's free bytes before anything is allocated
// (reserve()); every send and receive has a deadline, past which it is cancelled (UCX itself
// never notices a crashed peer in posix mode); cancel_peer() fails everything pending with a
// peer. Unexpected eager messages (sent before their receive is posted) wait in UCX's own
// buffers, at most eager_limit_bytes each; larger ones wait as a rendezvous header only.
//
// Thread safety: every public member may be called from any thread. Callbacks run on the
// channel's thread (or inside poll(), for a caller that polls), never inside send() or a
// receive call; keep them short (post a CAF message).

#include "core/error.hpp"

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace moert::transport {

enum class ucx_transport { tcp, posix };
const char* to_string(ucx_transport transport);

struct ucx_channel_config {
  ucx_transport transport = ucx_transport::tcp;
  std::size_t max_message_bytes = std::size_t{64} << 20;  // one tensor message
  std::size_t pool_bytes = std::size_t{256} << 20;        // receive bytes outstanding at once
  // Messages up to this size go eagerly (one way: no rendezvous round trip, and a receive
  // posted late finds the bytes already here); larger ones by rendezvous. UCX's own choice
  // is 8 KiB on both transports, below a decode step's rows.
  std::size_t eager_limit_bytes = std::size_t{256} << 10;
  std::chrono::milliseconds default_timeout{5000};
  // How long after a caller's last poll() the channel thread leaves the worker and the
  // callbacks to that caller (see poll()).
  std::chrono::milliseconds caller_poll_window{10};
};

using peer_id = std::uint64_t;

// Received bytes in a buffer of the channel's pool (reused, never zero-filled); destroying
// the last copy returns the buffer and its bytes' credit to the pool (the credit bounds how
// much a peer can make this process hold).
class received_buffer {
public:
  received_buffer() = default;
  received_buffer(std::shared_ptr<std::uint8_t> storage, std::size_t size)
      : storage_(std::move(storage)), size_(size) {}
  std::span<const std::uint8_t> bytes() const { return {storage_.get(), size_}; }
  const std::uint8_t* data() const { return storage_.get(); }
  std::size_t size() const { return size_; }
  // Keeps the bytes alive (e.g. while they are sent on); the pool gets them back after the
  // last holder.
  const std::shared_ptr<std::uint8_t>& storage() const { return storage_; }

private:
  std::shared_ptr<std::uint8_t> storage_;
  std::size_t size_ = 0;
};

class ucx_channel {
public:
  using send_done = std::function<void(status)>;
  using receive_done = std::function<void(result<received_buffer>)>;
  using receive_into_done = std::function<void(status)>;

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
  // Sends `size` bytes at `data`, which `keep` holds alive until UCX is done with them. An
  // empty `done` is allowed: nothing is called back (failures still count in send_failures()).
  void send(peer_id peer, std::uint64_t tag, const void* data, std::size_t size, std::shared_ptr<const void> keep,
            send_done done, std::chrono::milliseconds timeout = std::chrono::milliseconds{0});
  // Receives exactly `bytes` announced for `tag` (from `peer`, whose pending receives
  // cancel_peer() fails) into a pool buffer. Refused at once: bytes over max_message_bytes or
  // over the pool.
  void receive(peer_id peer, std::uint64_t tag, std::size_t bytes, receive_done done,
               std::chrono::milliseconds timeout = std::chrono::milliseconds{0});

  // Takes `bytes` of the pool's credit for a receive into the caller's own memory: refused
  // over max_message_bytes or when the pool is full. Destroying the result gives it back.
  result<std::shared_ptr<void>> reserve(std::size_t bytes);
  // Receives exactly `size` bytes for `tag` straight into `dest`, which `keep` holds alive
  // until UCX is done with it (which can be after a timeout was reported). Returns true when
  // the bytes are in `dest` already (`done` is not called), false when the receive is pending
  // (`done` gets the outcome later, on the channel thread), an error when it failed at once
  // (`done` is not called). A short or long message is an error, never a partial buffer.
  result<bool> receive_into(peer_id peer, std::uint64_t tag, void* dest, std::size_t size, std::shared_ptr<void> keep,
                            receive_into_done done, std::chrono::milliseconds timeout = std::chrono::milliseconds{0});
  // Drives UCX from the calling thread (a few progress calls) and runs, on this thread, the
  // callbacks that are ready; returns how many ran. For a caller with nothing else to do
  // while it waits (moert_bench_transport's polled figures, the pattern of ucx_perftest);
  // actors never call it, the channel thread does the same for them. For
  // config.caller_poll_window (10 ms) after a poll() the channel thread leaves the worker and
  // the callbacks to the polling caller (two threads spinning on one worker halve a small
  // machine's core) and only enforces the deadlines, whose callbacks the next poll() runs;
  // after that it drives again.
  std::size_t poll();
  // Fails every pending send and receive with `peer` (its node was found dead).
  void cancel_peer(peer_id peer, std::string reason);

  std::size_t pool_bytes_in_use() const;
  std::uint64_t send_failures() const;
  // Times the channel thread came back from sleeping (a wake-up, or its periodic look while
  // idle, at most every 100 ms): what arrivals and callers cost it. For tests and benches.
  std::uint64_t thread_wakeups() const;
  const ucx_channel_config& config() const { return config_; }

  struct impl;

private:
  explicit ucx_channel(std::unique_ptr<impl> state);
  std::unique_ptr<impl> impl_;
  std::string address_;
  ucx_channel_config config_;
};

}  // namespace moert::transport
