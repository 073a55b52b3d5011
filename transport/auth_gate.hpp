#pragma once

// Authenticating gates in front of CAF's middleman. CAF 0.17's BASP has no authentication
// hook and allocates whatever payload a peer's header announces, so no untrusted socket
// reaches it directly:
//
//   process A: CAF ──▶ 127.0.0.1:outbound_gate ══ network ══▶ inbound_gate ──▶ 127.0.0.1:CAF   process B
//
// Both gates run the mutual HMAC handshake (transport/handshake.hpp) on the connection
// before one byte of BASP passes, within `handshake_timeout` (a peer that connects and says
// nothing is closed). After it, the gates relay bytes and police the stream that comes from
// the network: every BASP frame header is read whole and a frame announcing more than
// `max_frame_bytes` closes the connection before CAF sees it. Connections are bounded.
// CAF itself only listens on loopback.
//
// The secret authenticates; it does not encrypt (Erlang's cookie model). For untrusted
// networks use TLS (CAF's OpenSSL module) instead.
//
// Thread safety: a gate runs its own threads; its public members may be called from any
// thread. Destruction closes every connection it relays and joins its threads.

#include "core/error.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

namespace moert::transport {

struct gate_limits {
  std::size_t max_frame_bytes = std::size_t{256} << 20;  // one BASP payload
  std::chrono::milliseconds handshake_timeout{2000};
  std::size_t max_connections = 64;                       // relayed plus handshaking
};

struct gate_counters {
  std::atomic<std::uint64_t> authenticated{0};
  std::atomic<std::uint64_t> refused{0};         // bad magic, wrong secret, replay, garbage
  std::atomic<std::uint64_t> timed_out{0};       // said nothing (or too little) in time
  std::atomic<std::uint64_t> oversized_frames{0};
  std::atomic<std::uint64_t> over_capacity{0};   // closed at once: max_connections reached
  std::atomic<std::uint64_t> bytes_from_network{0};  // relayed, after the handshake
  std::atomic<std::uint64_t> bytes_to_network{0};
};

// Listens on `host:port` (port 0: any) for peers and relays the authenticated ones to the
// CAF port `caf_port` on 127.0.0.1.
class inbound_gate {
public:
  static result<std::unique_ptr<inbound_gate>> start(const std::string& host, std::uint16_t port,
                                                     std::string secret, std::uint16_t caf_port,
                                                     gate_limits limits = {});
  ~inbound_gate();
  std::uint16_t port() const;
  const gate_counters& counters() const;
  struct impl;

private:
  explicit inbound_gate(std::unique_ptr<impl> state);
  std::unique_ptr<impl> impl_;
};

// Listens on 127.0.0.1 (any port) for this process's CAF and relays each connection to the
// remote gate at `remote_host:remote_port` after authenticating it.
class outbound_gate {
public:
  static result<std::unique_ptr<outbound_gate>> start(const std::string& remote_host, std::uint16_t remote_port,
                                                      std::string secret, gate_limits limits = {});
  ~outbound_gate();
  std::uint16_t local_port() const;
  const gate_counters& counters() const;
  struct impl;

private:
  explicit outbound_gate(std::unique_ptr<impl> state);
  std::unique_ptr<impl> impl_;
};

// True for 127.0.0.0/8, ::1 and "localhost".
bool is_loopback(const std::string& host);

// The handshake as the gates speak it on a connected socket (exposed for tests that play a
// hostile peer). Each returns an error naming what failed; all reads are bounded by
// `deadline`.
status gate_handshake_as_initiator(int fd, const std::string& secret, std::chrono::steady_clock::time_point deadline);
status gate_handshake_as_responder(int fd, const std::string& secret, std::chrono::steady_clock::time_point deadline);

inline constexpr std::size_t basp_header_bytes = 32;  // caf/io/basp/header.hpp: header_size
inline constexpr std::size_t basp_payload_length_offset = 4;  // big-endian uint32

}  // namespace moert::transport
