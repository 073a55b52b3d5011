#include "server/connection_watch.hpp"

#include <dirent.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <cstdlib>
#include <cstring>

namespace moert::server {

namespace {

int port_of(const sockaddr_storage& addr) {
  if (addr.ss_family == AF_INET)
    return ntohs(reinterpret_cast<const sockaddr_in*>(&addr)->sin_port);
  if (addr.ss_family == AF_INET6)
    return ntohs(reinterpret_cast<const sockaddr_in6*>(&addr)->sin6_port);
  return -1;
}

// As httplib spells a peer: getnameinfo with NI_NUMERICHOST.
bool numeric_host(const sockaddr_storage& addr, socklen_t len, std::string& host) {
  char buf[NI_MAXHOST];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&addr), len, buf, sizeof buf, nullptr, 0, NI_NUMERICHOST) != 0)
    return false;
  host = buf;
  return true;
}

}  // namespace

connection_watch::connection_watch(const std::string& remote_addr, int remote_port, int local_port) {
  DIR* dir = opendir("/proc/self/fd");
  if (!dir)
    return;
  while (dirent* entry = readdir(dir)) {
    char* end = nullptr;
    long fd = std::strtol(entry->d_name, &end, 10);
    if (*end != '\0' || end == entry->d_name)
      continue;
    sockaddr_storage peer{}, local{};
    socklen_t peer_len = sizeof peer, local_len = sizeof local;
    if (getpeername(int(fd), reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0 ||
        getsockname(int(fd), reinterpret_cast<sockaddr*>(&local), &local_len) != 0)
      continue;
    // Ports first (cheap); the address text only for a candidate.
    if (port_of(peer) != remote_port || port_of(local) != local_port)
      continue;
    std::string peer_host;
    if (numeric_host(peer, peer_len, peer_host) && peer_host == remote_addr) {
      fd_ = int(fd);
      break;
    }
  }
  closedir(dir);
}

bool connection_watch::peer_gone() {
  if (fd_ < 0 || gone_)
    return gone_;
  pollfd p{fd_, POLLRDHUP, 0};
  if (poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)))
    gone_ = true;
  return gone_;
}

}  // namespace moert::server
