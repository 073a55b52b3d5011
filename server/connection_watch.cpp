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

bool describe(const sockaddr_storage& addr, socklen_t len, std::string& host, int& port) {
  char buf[NI_MAXHOST];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&addr), len, buf, sizeof buf, nullptr, 0, NI_NUMERICHOST) != 0)
    return false;
  host = buf;
  if (addr.ss_family == AF_INET)
    port = ntohs(reinterpret_cast<const sockaddr_in*>(&addr)->sin_port);
  else if (addr.ss_family == AF_INET6)
    port = ntohs(reinterpret_cast<const sockaddr_in6*>(&addr)->sin6_port);
  else
    return false;
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
    std::string peer_host, local_host;
    int peer_port = -1, port = -1;
    if (describe(peer, peer_len, peer_host, peer_port) && describe(local, local_len, local_host, port) &&
        peer_port == remote_port && port == local_port && peer_host == remote_addr) {
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
