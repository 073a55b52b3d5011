#pragma once

// Notices that an HTTP client went away while its request is still generating.
// cpp-httplib 0.11 hands a handler neither the socket nor an is_connection_closed(): a
// non-streamed handler would learn of a disconnect only when it finally writes, and a stream
// only at its next token. So the handler finds its own connection's socket once, by the
// connection's addresses (unique while the connection is open, and the connection stays open
// while its handler runs), and polls it for the peer's FIN or RST while it waits.
//
// Thread safety: one watch per request, used from that request's thread.

#include <string>

namespace moert::server {

class connection_watch {
public:
  // remote_addr/remote_port as httplib reports them (getnameinfo NI_NUMERICHOST), local_port
  // the port the server listens on. Without a match the watch never reports a disconnect.
  connection_watch(const std::string& remote_addr, int remote_port, int local_port);

  bool found() const { return fd_ >= 0; }
  // True once the peer has closed or reset the connection (never blocks).
  bool peer_gone();

private:
  int fd_ = -1;
  bool gone_ = false;
};

}  // namespace moert::server
