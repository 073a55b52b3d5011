#include <catch2/catch.hpp>

#include "transport/auth_gate.hpp"
#include "transport/handshake.hpp"

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>

using namespace moert;
using namespace moert::transport;
using namespace std::chrono_literals;

namespace {

std::string write_secret(const std::string& name, const std::string& text) {
  auto path = std::filesystem::temp_directory_path() / ("moert-gate-" + std::to_string(::getpid()) + "-" + name);
  std::ofstream{path} << text << "\n";
  ::chmod(path.c_str(), 0600);
  return path.string();
}

// The node under test: a real process (tests/transport/gate_peer.cpp).
class node_process {
public:
  node_process(const std::string& secret_file, int handshake_timeout_ms, std::size_t max_frame_bytes) {
    int out[2], in[2];
    REQUIRE(::pipe(out) == 0);
    REQUIRE(::pipe(in) == 0);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(out[1], 1);
      ::dup2(in[0], 0);
      ::close(out[0]);
      ::close(in[1]);
      auto timeout = std::to_string(handshake_timeout_ms);
      auto frame = std::to_string(max_frame_bytes);
      ::execl(MOERT_GATE_PEER, MOERT_GATE_PEER, secret_file.c_str(), timeout.c_str(), frame.c_str(), nullptr);
      ::_exit(127);
    }
    ::close(out[1]);
    ::close(in[0]);
    stdin_ = in[1];
    FILE* reader = ::fdopen(out[0], "r");
    pollfd p{out[0], POLLIN, 0};
    REQUIRE(::poll(&p, 1, 10000) == 1);
    unsigned port = 0;
    REQUIRE(std::fscanf(reader, "port %u", &port) == 1);
    port_ = static_cast<std::uint16_t>(port);
    reader_ = reader;
  }
  ~node_process() {
    ::close(stdin_);
    int status = 0;
    for (int i = 0; i < 50 && ::waitpid(pid_, &status, WNOHANG) == 0; ++i)
      std::this_thread::sleep_for(100ms);
    if (::waitpid(pid_, &status, WNOHANG) == 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &status, 0);
    }
    std::fclose(reader_);
  }
  std::uint16_t port() const { return port_; }

private:
  pid_t pid_ = -1;
  int stdin_ = -1;
  FILE* reader_ = nullptr;
  std::uint16_t port_ = 0;
};

int raw_connect(std::uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
  return fd;
}

// Waits until the peer closes `fd` (or `limit` passes); returns how long that took.
std::chrono::milliseconds time_until_closed(int fd, std::chrono::milliseconds limit) {
  auto start = std::chrono::steady_clock::now();
  char buffer[256];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    auto left = limit - std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
    if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0)
      return limit + 1ms;
    auto got = ::recv(fd, buffer, sizeof buffer, 0);
    if (got <= 0)
      return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
  }
}

struct client {
  caf::actor_system_config config;
  std::unique_ptr<caf::actor_system> system;
  client() {
    config.load<caf::io::middleman>();
    system = std::make_unique<caf::actor_system>(config);
  }
  caf::expected<caf::actor> connect(std::uint16_t local_port) {
    return system->middleman().remote_actor("127.0.0.1", local_port);
  }
  template <class Reply, class... Ts>
  std::optional<Reply> ask(const caf::actor& to, Ts... xs) {
    caf::scoped_actor self{*system};
    std::optional<Reply> reply;
    self->request(to, std::chrono::seconds{5}, xs...).receive([&](Reply r) { reply = std::move(r); },
                                                              [&](caf::error&) {});
    return reply;
  }
};

std::vector<std::uint64_t> node_counters(std::uint16_t gate_port, const std::string& secret) {
  auto gate = outbound_gate::start("127.0.0.1", gate_port, secret);
  REQUIRE(gate.ok());
  client c;
  auto node = c.connect((*gate)->local_port());
  REQUIRE(node);
  auto counters = c.ask<std::string>(*node, caf::get_atom_v);
  REQUIRE(counters);
  std::vector<std::uint64_t> values;
  std::istringstream in{*counters};
  for (std::uint64_t v; in >> v;)
    values.push_back(v);
  REQUIRE(values.size() == 5);
  return values;
}
enum counter { authenticated, refused, timed_out, oversized, over_capacity };

}  // namespace

TEST_CASE("authenticated peers reach the node's actors through the gates; others never do") {
  auto secret_file = write_secret("node", "the-cluster-secret");
  node_process node{secret_file, 500, 1 << 20};

  SECTION("the right secret: requests and a large payload go through") {
    auto gate = outbound_gate::start("127.0.0.1", node.port(), "the-cluster-secret");
    REQUIRE(gate.ok());
    client c;
    auto echo = c.connect((*gate)->local_port());
    REQUIRE(echo);
    CHECK(c.ask<int>(*echo, 21) == 42);
    std::string big(512 * 1024, 'x');
    CHECK(c.ask<std::string>(*echo, big) == big);
  }

  SECTION("a wrong secret: no actor, the connection is refused, the node serves on") {
    auto gate = outbound_gate::start("127.0.0.1", node.port(), "a-guess");
    REQUIRE(gate.ok());
    client c;
    auto start = std::chrono::steady_clock::now();
    auto echo = c.connect((*gate)->local_port());
    CHECK_FALSE(echo);
    CHECK(std::chrono::steady_clock::now() - start < 10s);
    CHECK((*gate)->counters().authenticated == 0);
    auto counters = node_counters(node.port(), "the-cluster-secret");
    CHECK(counters[refused] >= 1);
  }

  SECTION("no secret at all: a raw client speaking BASP or garbage is closed") {
    int fd = raw_connect(node.port());
    std::string garbage = "GET / HTTP/1.0\r\n\r\n" + std::string(1000, '\x7f');
    ::send(fd, garbage.data(), garbage.size(), MSG_NOSIGNAL);
    CHECK(time_until_closed(fd, 3000ms) < 3000ms);
    ::close(fd);
    CHECK(node_counters(node.port(), "the-cluster-secret")[refused] >= 1);
  }

  SECTION("a client that connects and says nothing is closed after the handshake timeout") {
    int fd = raw_connect(node.port());
    auto waited = time_until_closed(fd, 5000ms);
    ::close(fd);
    CHECK(waited >= 400ms);
    CHECK(waited < 3000ms);
    CHECK(node_counters(node.port(), "the-cluster-secret")[timed_out] >= 1);
  }

  SECTION("a recorded handshake replayed is refused") {
    // Record an honest exchange.
    int fd = raw_connect(node.port());
    handshake_initiator honest{"the-cluster-secret"};
    std::string hello = "MOE1" + honest.hello();
    ::send(fd, hello.data(), hello.size(), MSG_NOSIGNAL);
    std::string challenge(64, '\0');
    REQUIRE(::recv(fd, challenge.data(), challenge.size(), MSG_WAITALL) == 64);
    auto answer = honest.answer(challenge);
    REQUIRE(answer.ok());
    ::send(fd, answer->data(), answer->size(), MSG_NOSIGNAL);
    char verdict = 0;
    REQUIRE(::recv(fd, &verdict, 1, MSG_WAITALL) == 1);
    CHECK(verdict == 1);
    ::close(fd);
    // Replay it on a new connection: the node's nonce is new, the old answer fails.
    int replay = raw_connect(node.port());
    ::send(replay, hello.data(), hello.size(), MSG_NOSIGNAL);
    REQUIRE(::recv(replay, challenge.data(), challenge.size(), MSG_WAITALL) == 64);
    ::send(replay, answer->data(), answer->size(), MSG_NOSIGNAL);
    CHECK(::recv(replay, &verdict, 1, 0) <= 0);  // closed, never accepted
    ::close(replay);
  }

  SECTION("an authenticated peer announcing a 4 GiB frame is cut off before CAF allocates") {
    int fd = raw_connect(node.port());
    REQUIRE(gate_handshake_as_initiator(fd, "the-cluster-secret", std::chrono::steady_clock::now() + 2s).ok());
    unsigned char header[basp_header_bytes] = {};
    header[0] = 1;  // a BASP operation byte
    std::uint32_t huge = htonl(0xFFFFFFFFu);
    std::memcpy(header + basp_payload_length_offset, &huge, sizeof huge);
    ::send(fd, header, sizeof header, MSG_NOSIGNAL);
    CHECK(time_until_closed(fd, 3000ms) < 3000ms);
    ::close(fd);
    auto counters = node_counters(node.port(), "the-cluster-secret");
    CHECK(counters[oversized] == 1);
    CHECK(counters[authenticated] >= 2);  // the hostile one, then ours: the node serves on
  }
  std::filesystem::remove(secret_file);
}

TEST_CASE("gates refuse to start without a secret and bind what they are told") {
  CHECK_FALSE(inbound_gate::start("127.0.0.1", 0, "", 1).ok());
  CHECK_FALSE(outbound_gate::start("127.0.0.1", 1, "").ok());
  CHECK(is_loopback("127.0.0.1"));
  CHECK(is_loopback("127.3.2.1"));
  CHECK(is_loopback("localhost"));
  CHECK(is_loopback("::1"));
  CHECK_FALSE(is_loopback("0.0.0.0"));
  CHECK_FALSE(is_loopback("10.1.2.3"));
  auto gate = inbound_gate::start("127.0.0.1", 0, "s", 1);
  REQUIRE(gate.ok());
  CHECK((*gate)->port() != 0);
}
