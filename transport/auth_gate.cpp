#include "transport/auth_gate.hpp"

#include "transport/handshake.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <list>
#include <mutex>
#include <thread>
#include <vector>

namespace moert::transport {
namespace {

using clock = std::chrono::steady_clock;
constexpr char magic[4] = {'M', 'O', 'E', '1'};
constexpr std::uint8_t accepted_byte = 1;
constexpr std::chrono::milliseconds stop_poll{100};

error socket_error(const std::string& what) {
  return make_error(error_code::io_error, what + ": " + std::strerror(errno));
}

class socket_fd {
public:
  socket_fd() = default;
  explicit socket_fd(int fd) : fd_(fd) {}
  socket_fd(socket_fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  socket_fd& operator=(socket_fd&& other) noexcept {
    reset();
    fd_ = std::exchange(other.fd_, -1);
    return *this;
  }
  ~socket_fd() { reset(); }
  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0)
      ::close(fd_);
    fd_ = -1;
  }

private:
  int fd_ = -1;
};

int remaining_ms(clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now()).count();
  return left < 0 ? 0 : static_cast<int>(left);
}

status read_exact(int fd, void* data, std::size_t size, clock::time_point deadline) {
  auto* bytes = static_cast<char*>(data);
  while (size > 0) {
    pollfd p{fd, POLLIN, 0};
    int ready = ::poll(&p, 1, remaining_ms(deadline));
    if (ready == 0)
      return make_error(error_code::io_error, "handshake: timed out");
    if (ready < 0)
      return socket_error("handshake: poll");
    auto got = ::recv(fd, bytes, size, 0);
    if (got == 0)
      return make_error(error_code::io_error, "handshake: the peer closed the connection");
    if (got < 0) {
      if (errno == EINTR || errno == EAGAIN)
        continue;
      return socket_error("handshake: recv");
    }
    bytes += got;
    size -= static_cast<std::size_t>(got);
  }
  return status::success();
}

status write_all(int fd, const void* data, std::size_t size, clock::time_point deadline) {
  auto* bytes = static_cast<const char*>(data);
  while (size > 0) {
    pollfd p{fd, POLLOUT, 0};
    int ready = ::poll(&p, 1, remaining_ms(deadline));
    if (ready == 0)
      return make_error(error_code::io_error, "write timed out");
    if (ready < 0)
      return socket_error("poll");
    auto sent = ::send(fd, bytes, size, MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR || errno == EAGAIN)
        continue;
      return socket_error("send");
    }
    bytes += sent;
    size -= static_cast<std::size_t>(sent);
  }
  return status::success();
}

void set_nodelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

result<socket_fd> listen_on(const std::string& host, std::uint16_t port, std::uint16_t& bound_port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  auto service = std::to_string(port);
  if (int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &found); rc != 0)
    return make_error(error_code::invalid_argument, "listen address " + host + ": " + ::gai_strerror(rc));
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> guard{found, &::freeaddrinfo};
  socket_fd fd{::socket(found->ai_family, found->ai_socktype | SOCK_CLOEXEC, found->ai_protocol)};
  if (fd.get() < 0)
    return socket_error("socket");
  int one = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(fd.get(), found->ai_addr, found->ai_addrlen) != 0)
    return socket_error("bind " + host + ":" + service);
  if (::listen(fd.get(), 64) != 0)
    return socket_error("listen " + host + ":" + service);
  sockaddr_storage address{};
  socklen_t length = sizeof address;
  ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&address), &length);
  bound_port = ntohs(address.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&address)->sin6_port
                                                   : reinterpret_cast<sockaddr_in*>(&address)->sin_port);
  return fd;
}

result<socket_fd> connect_to(const std::string& host, std::uint16_t port, clock::time_point deadline) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  auto service = std::to_string(port);
  if (int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &found); rc != 0)
    return make_error(error_code::invalid_argument, "address " + host + ": " + ::gai_strerror(rc));
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> guard{found, &::freeaddrinfo};
  socket_fd fd{::socket(found->ai_family, found->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, found->ai_protocol)};
  if (fd.get() < 0)
    return socket_error("socket");
  if (::connect(fd.get(), found->ai_addr, found->ai_addrlen) != 0 && errno != EINPROGRESS)
    return socket_error("connect " + host + ":" + service);
  pollfd p{fd.get(), POLLOUT, 0};
  if (::poll(&p, 1, remaining_ms(deadline)) <= 0)
    return make_error(error_code::io_error, "connect " + host + ":" + service + ": timed out");
  int failure = 0;
  socklen_t length = sizeof failure;
  ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &failure, &length);
  if (failure != 0) {
    errno = failure;
    return socket_error("connect " + host + ":" + service);
  }
  set_nodelay(fd.get());
  return fd;
}

// Polices the byte stream from the network: BASP frames are a 32-byte header carrying the
// payload length, then the payload. A header is held back until it is whole and checked.
class frame_police {
public:
  explicit frame_police(std::size_t max_frame_bytes) : max_(max_frame_bytes) {}

  // Appends to `out` what may pass; false when a frame is over the limit.
  bool feed(const char* data, std::size_t size, std::string& out) {
    while (size > 0) {
      if (payload_left_ > 0) {
        auto take = static_cast<std::size_t>(std::min<std::uint64_t>(payload_left_, size));
        out.append(data, take);
        payload_left_ -= take;
        data += take;
        size -= take;
        continue;
      }
      auto take = std::min(basp_header_bytes - have_, size);
      std::memcpy(header_ + have_, data, take);
      have_ += take;
      data += take;
      size -= take;
      if (have_ < basp_header_bytes)
        break;
      std::uint32_t length_be = 0;
      std::memcpy(&length_be, header_ + basp_payload_length_offset, sizeof length_be);
      std::uint32_t length = ntohl(length_be);
      if (length > max_)
        return false;
      out.append(header_, basp_header_bytes);
      have_ = 0;
      payload_left_ = length;
    }
    return true;
  }

private:
  std::size_t max_;
  char header_[basp_header_bytes]{};
  std::size_t have_ = 0;
  std::uint64_t payload_left_ = 0;
};

// Relays until either side closes, the stop flag is set or a frame breaks the limit.
void relay(int network, int local, const gate_limits& limits, gate_counters& counters,
           const std::atomic<bool>& stopping) {
  frame_police police{limits.max_frame_bytes};
  std::vector<char> buffer(1 << 16);
  std::string passed;
  while (!stopping.load()) {
    pollfd fds[2] = {{network, POLLIN, 0}, {local, POLLIN, 0}};
    int ready = ::poll(fds, 2, static_cast<int>(stop_poll.count()));
    if (ready < 0 && errno != EINTR)
      return;
    if (ready <= 0)
      continue;
    for (int side = 0; side < 2; ++side) {
      if (!(fds[side].revents & (POLLIN | POLLHUP | POLLERR)))
        continue;
      auto got = ::recv(fds[side].fd, buffer.data(), buffer.size(), 0);
      if (got <= 0)
        return;
      // Writes to a peer that stops reading must not hang the relay forever.
      auto deadline = clock::now() + std::chrono::seconds{30};
      if (side == 0) {
        passed.clear();
        if (!police.feed(buffer.data(), static_cast<std::size_t>(got), passed)) {
          counters.oversized_frames++;
          return;
        }
        if (!write_all(local, passed.data(), passed.size(), deadline).ok())
          return;
        counters.bytes_from_network += std::uint64_t(got);
      } else {
        if (!write_all(network, buffer.data(), static_cast<std::size_t>(got), deadline).ok())
          return;
        counters.bytes_to_network += std::uint64_t(got);
      }
    }
  }
}

// The threads of a gate: one accept loop, one per connection.
struct gate_threads {
  struct connection {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> finished = std::make_shared<std::atomic<bool>>(false);
  };
  std::atomic<bool> stopping{false};
  std::mutex mutex;
  std::list<connection> connections;
  std::thread acceptor;

  std::size_t active() {
    std::lock_guard<std::mutex> guard{mutex};
    for (auto it = connections.begin(); it != connections.end();)
      if (it->finished->load()) {
        it->thread.join();
        it = connections.erase(it);
      } else {
        ++it;
      }
    return connections.size();
  }
  template <class F>
  void spawn(F work) {
    std::lock_guard<std::mutex> guard{mutex};
    auto& c = connections.emplace_back();
    c.thread = std::thread([work = std::move(work), finished = c.finished]() mutable {
      work();
      finished->store(true);
    });
  }
  void stop() {
    stopping.store(true);
    if (acceptor.joinable())
      acceptor.join();
    std::lock_guard<std::mutex> guard{mutex};
    for (auto& c : connections)
      c.thread.join();
    connections.clear();
  }
};

// Accepts on `listener` until stopped; `serve` runs on a thread per accepted connection.
template <class Serve>
void accept_loop(int listener, gate_threads& threads, const gate_limits& limits, gate_counters& counters,
                 Serve serve) {
  while (!threads.stopping.load()) {
    pollfd p{listener, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(stop_poll.count())) <= 0)
      continue;
    socket_fd accepted{::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC)};
    if (accepted.get() < 0)
      continue;
    if (threads.active() >= limits.max_connections) {
      counters.over_capacity++;
      continue;  // closed as it goes out of scope
    }
    set_nodelay(accepted.get());
    threads.spawn([fd = std::make_shared<socket_fd>(std::move(accepted)), serve] { serve(std::move(*fd)); });
  }
}

void count_failure(const status& outcome, gate_counters& counters) {
  if (outcome.err().message.find("timed out") != std::string::npos)
    counters.timed_out++;
  else
    counters.refused++;
}

}  // namespace

bool is_loopback(const std::string& host) {
  if (host == "localhost" || host == "::1")
    return true;
  in_addr address{};
  return ::inet_pton(AF_INET, host.c_str(), &address) == 1 && (ntohl(address.s_addr) >> 24) == 127;
}

status gate_handshake_as_initiator(int fd, const std::string& secret, clock::time_point deadline) {
  handshake_initiator initiator{secret};
  std::string hello = std::string(magic, sizeof magic) + initiator.hello();
  MOERT_TRY(write_all(fd, hello.data(), hello.size(), deadline));
  std::string challenge(nonce_bytes + proof_bytes, '\0');
  MOERT_TRY(read_exact(fd, challenge.data(), challenge.size(), deadline));
  auto answer = initiator.answer(challenge);
  if (!answer.ok())
    return answer.err();
  MOERT_TRY(write_all(fd, answer->data(), answer->size(), deadline));
  std::uint8_t verdict = 0;
  if (!read_exact(fd, &verdict, 1, deadline).ok() || verdict != accepted_byte)
    return make_error(error_code::invalid_argument, "handshake: the peer refused our proof (wrong secret?)");
  return status::success();
}

status gate_handshake_as_responder(int fd, const std::string& secret, clock::time_point deadline) {
  handshake_responder responder{secret};
  char hello[sizeof magic + nonce_bytes];
  MOERT_TRY(read_exact(fd, hello, sizeof hello, deadline));
  if (std::memcmp(hello, magic, sizeof magic) != 0)
    return make_error(error_code::invalid_argument, "handshake: not a moert peer (bad magic)");
  auto challenge = responder.challenge(std::string_view(hello + sizeof magic, nonce_bytes));
  if (!challenge.ok())
    return challenge.err();
  MOERT_TRY(write_all(fd, challenge->data(), challenge->size(), deadline));
  char answer[proof_bytes];
  MOERT_TRY(read_exact(fd, answer, sizeof answer, deadline));
  MOERT_TRY(responder.verify(std::string_view(answer, sizeof answer)));
  return write_all(fd, &accepted_byte, 1, deadline);
}

namespace {

// Binds `host:port` for a gate and starts its accept loop; each connection runs gate.serve().
template <class Gate>
status listen_and_serve(Gate& gate, const std::string& host, std::uint16_t port) {
  auto listener = listen_on(host, port, gate.port);
  if (!listener.ok())
    return listener.err();
  gate.listener = std::move(*listener);
  gate.threads.acceptor = std::thread([&gate] {
    accept_loop(gate.listener.get(), gate.threads, gate.limits, gate.counters,
                [&gate](socket_fd peer) { gate.serve(std::move(peer)); });
  });
  return status::success();
}

}  // namespace

// -- inbound -------------------------------------------------------------------------------

struct inbound_gate::impl {
  std::string secret;
  std::uint16_t caf_port = 0;
  std::uint16_t port = 0;
  gate_limits limits;
  gate_counters counters;
  socket_fd listener;
  gate_threads threads;

  void serve(socket_fd peer) {
    auto deadline = clock::now() + limits.handshake_timeout;
    auto outcome = gate_handshake_as_responder(peer.get(), secret, deadline);
    if (!outcome.ok()) {
      count_failure(outcome, counters);
      return;
    }
    counters.authenticated++;
    auto local = connect_to("127.0.0.1", caf_port, clock::now() + std::chrono::seconds{2});
    if (!local.ok())
      return;
    relay(peer.get(), local->get(), limits, counters, threads.stopping);
  }
};

result<std::unique_ptr<inbound_gate>> inbound_gate::start(const std::string& host, std::uint16_t port,
                                                          std::string secret, std::uint16_t caf_port,
                                                          gate_limits limits) {
  if (secret.empty())
    return make_error(error_code::invalid_argument, "inbound gate: an empty secret");
  auto state = std::make_unique<impl>();
  state->secret = std::move(secret);
  state->caf_port = caf_port;
  state->limits = limits;
  MOERT_TRY(listen_and_serve(*state, host, port));
  return std::unique_ptr<inbound_gate>{new inbound_gate(std::move(state))};
}

inbound_gate::inbound_gate(std::unique_ptr<impl> state) : impl_(std::move(state)) {}
inbound_gate::~inbound_gate() { impl_->threads.stop(); }
std::uint16_t inbound_gate::port() const { return impl_->port; }
const gate_counters& inbound_gate::counters() const { return impl_->counters; }

// -- outbound ------------------------------------------------------------------------------

struct outbound_gate::impl {
  std::string secret;
  std::string remote_host;
  std::uint16_t remote_port = 0;
  std::uint16_t port = 0;
  gate_limits limits;
  gate_counters counters;
  socket_fd listener;
  gate_threads threads;

  void serve(socket_fd local) {
    auto deadline = clock::now() + limits.handshake_timeout;
    auto remote = connect_to(remote_host, remote_port, deadline);
    if (!remote.ok()) {
      counters.refused++;
      return;
    }
    auto outcome = gate_handshake_as_initiator(remote->get(), secret, deadline);
    if (!outcome.ok()) {
      count_failure(outcome, counters);
      return;
    }
    counters.authenticated++;
    relay(remote->get(), local.get(), limits, counters, threads.stopping);
  }
};

result<std::unique_ptr<outbound_gate>> outbound_gate::start(const std::string& remote_host,
                                                            std::uint16_t remote_port, std::string secret,
                                                            gate_limits limits) {
  if (secret.empty())
    return make_error(error_code::invalid_argument, "outbound gate: an empty secret");
  auto state = std::make_unique<impl>();
  state->secret = std::move(secret);
  state->remote_host = remote_host;
  state->remote_port = remote_port;
  state->limits = limits;
  MOERT_TRY(listen_and_serve(*state, "127.0.0.1", 0));
  return std::unique_ptr<outbound_gate>{new outbound_gate(std::move(state))};
}

outbound_gate::outbound_gate(std::unique_ptr<impl> state) : impl_(std::move(state)) {}
outbound_gate::~outbound_gate() { impl_->threads.stop(); }
std::uint16_t outbound_gate::local_port() const { return impl_->port; }
const gate_counters& outbound_gate::counters() const { return impl_->counters; }

}  // namespace moert::transport
