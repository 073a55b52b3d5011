#include <catch2/catch.hpp>

#include "transport/ucx_channel.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <future>
#include <list>
#include <string>
#include <thread>

// Regression: messages above the eager cut-off (rendezvous, e.g. prefill blocks) between two
// processes sometimes missed their completion and timed out ("echo UCX receive: timed out at
// 1048576 bytes, iteration 0" in moert_bench_transport). Two processes echo 300 KiB, 1 MiB
// and 4 MiB many times, with the receive posted before the bytes arrive and after (the
// probe path), and every round trip must come back whole within its timeout.

using namespace moert;
using namespace moert::transport;
using namespace std::chrono_literals;

namespace {

constexpr std::array<std::size_t, 3> sizes{300 << 10, 1 << 20, 4 << 20};
constexpr std::size_t round_trips = 200;
constexpr auto op_timeout = 3000ms;

bool write_all(int fd, const void* data, std::size_t size) {
  auto* bytes = static_cast<const char*>(data);
  while (size > 0) {
    auto written = ::write(fd, bytes, size);
    if (written <= 0)
      return false;
    bytes += written;
    size -= static_cast<std::size_t>(written);
  }
  return true;
}
bool read_all(int fd, void* data, std::size_t size) {
  auto* bytes = static_cast<char*>(data);
  while (size > 0) {
    auto got = ::read(fd, bytes, size);
    if (got <= 0)
      return false;
    bytes += got;
    size -= static_cast<std::size_t>(got);
  }
  return true;
}
bool send_string(int fd, const std::string& s) {
  auto size = static_cast<std::uint32_t>(s.size());
  return write_all(fd, &size, sizeof size) && write_all(fd, s.data(), s.size());
}
std::string receive_string(int fd) {
  std::uint32_t size = 0;
  if (!read_all(fd, &size, sizeof size) || size > (1u << 20))
    return {};
  std::string s(size, '\0');
  return read_all(fd, s.data(), size) ? s : std::string{};
}

// The round trip's receive is posted late (after the bytes arrived: probe path) on some
// rounds, early on others, at both ends.
bool late_at_echo(std::size_t round) { return round % 4 == 1 || round % 4 == 2; }
bool late_at_driver(std::size_t round) { return round % 4 == 2 || round % 4 == 3; }

// The echo process: no Catch here (another process). Exit code 0 when every round came back.
int run_echo(ucx_transport transport, int to_parent, int from_parent) {
  auto made = ucx_channel::create({.transport = transport, .default_timeout = op_timeout});
  if (!made.ok())
    return 10;
  auto& channel = **made;
  if (!send_string(to_parent, channel.address()))
    return 11;
  auto parent = channel.connect(receive_string(from_parent));
  if (!parent.ok())
    return 12;
  for (std::size_t round = 0; round < round_trips; ++round) {
    auto bytes = sizes[round % sizes.size()];
    if (late_at_echo(round))
      std::this_thread::sleep_for(2ms);
    std::promise<result<received_buffer>> received;
    auto got = received.get_future();
    channel.receive(*parent, round, bytes, [&](result<received_buffer> r) { received.set_value(std::move(r)); });
    if (got.wait_for(op_timeout + 2s) != std::future_status::ready)
      return 13;  // no callback at all: a wait without an end
    auto buffer = got.get();
    if (!buffer.ok())
      return 14;
    std::promise<status> sent;
    auto echoed = sent.get_future();
    channel.send(*parent, round, buffer->data(), buffer->size(), buffer->storage(),
                 [&](status s) { sent.set_value(std::move(s)); });
    if (echoed.wait_for(op_timeout + 2s) != std::future_status::ready || !echoed.get().ok())
      return 15;
  }
  return 0;
}

struct echo_outcome {
  std::size_t completed = 0;
  std::string first_failure;
  int child_exit = -1;
  double seconds = 0;
};

echo_outcome echo_many(ucx_transport transport) {
  echo_outcome outcome;
  int up[2], down[2];
  if (::pipe(up) != 0 || ::pipe(down) != 0) {
    outcome.first_failure = "pipe failed";
    return outcome;
  }
  pid_t child = ::fork();
  if (child == 0) {
    ::close(up[0]);
    ::close(down[1]);
    ::_exit(run_echo(transport, up[1], down[0]));
  }
  ::close(up[1]);
  ::close(down[0]);
  auto start = std::chrono::steady_clock::now();
  {
    // Outlive the channel: a receive still pending when a round fails holds its promise.
    std::list<std::promise<result<received_buffer>>> backs;
    std::list<std::promise<status>> sents;
    auto made = ucx_channel::create({.transport = transport, .default_timeout = op_timeout});
    if (!made.ok()) {
      outcome.first_failure = made.err().message;
    } else {
      auto& channel = **made;
      auto echo = channel.connect(receive_string(up[0]));
      send_string(down[1], channel.address());
      std::vector<std::shared_ptr<std::vector<std::uint8_t>>> payloads;
      for (auto bytes : sizes) {
        auto payload = std::make_shared<std::vector<std::uint8_t>>(bytes);
        for (std::size_t i = 0; i < bytes; ++i)
          (*payload)[i] = static_cast<std::uint8_t>(i * 7 + (i >> 12));
        payloads.push_back(payload);
      }
      for (std::size_t round = 0; echo.ok() && round < round_trips; ++round) {
        const auto& payload = payloads[round % sizes.size()];
        auto& back = backs.emplace_back();
        auto future = back.get_future();
        auto post = [&] {
          channel.receive(*echo, round, payload->size(),
                          [&back](result<received_buffer> r) { back.set_value(std::move(r)); });
        };
        if (!late_at_driver(round))
          post();
        auto& sent = sents.emplace_back();
        auto delivered = sent.get_future();
        channel.send(*echo, round, payload, [&sent](status s) { sent.set_value(std::move(s)); });
        if (late_at_driver(round)) {
          std::this_thread::sleep_for(2ms);
          post();
        }
        std::string failure;
        if (delivered.wait_for(op_timeout + 2s) != std::future_status::ready)
          failure = "send: no callback";
        else if (auto s = delivered.get(); !s.ok())
          failure = "send: " + s.err().message;
        if (future.wait_for(op_timeout + 2s) != std::future_status::ready) {
          failure += failure.empty() ? "receive: no callback" : "";
          outcome.first_failure = failure + " at " + std::to_string(payload->size()) + " bytes, round " +
                                  std::to_string(round);
          break;
        }
        auto got = future.get();
        if (failure.empty() && !got.ok())
          failure = "receive: " + got.err().message;
        else if (failure.empty() &&
                 !std::equal(got->bytes().begin(), got->bytes().end(), payload->begin(), payload->end()))
          failure = "echo differs";
        if (!failure.empty()) {
          outcome.first_failure = failure + " at " + std::to_string(payload->size()) + " bytes, round " +
                                  std::to_string(round);
          break;
        }
        ++outcome.completed;
      }
      if (!echo.ok())
        outcome.first_failure = echo.err().message;
    }
  }
  outcome.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!outcome.first_failure.empty())
    ::kill(child, SIGKILL);  // out of step now
  int child_status = 0;
  ::waitpid(child, &child_status, 0);
  outcome.child_exit = WIFEXITED(child_status) ? WEXITSTATUS(child_status) : 128 + WTERMSIG(child_status);
  ::close(up[0]);
  ::close(down[1]);
  return outcome;
}

}  // namespace

TEST_CASE("rendezvous-size messages echo between two processes without a missed completion") {
  for (auto transport : {ucx_transport::posix, ucx_transport::tcp}) {
    DYNAMIC_SECTION(to_string(transport)) {
      auto outcome = echo_many(transport);
      INFO(to_string(transport) << ": " << outcome.completed << " of " << round_trips << " round trips in "
                                << outcome.seconds << " s; " << outcome.first_failure);
      CHECK(outcome.first_failure.empty());
      CHECK(outcome.completed == round_trips);
      CHECK(outcome.child_exit == 0);
    }
  }
}
