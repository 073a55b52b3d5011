#include <catch2/catch.hpp>

#include "transport/pipe_transport.hpp"

#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <string>
#include <thread>

using namespace moert;
using namespace moert::transport;
using namespace std::chrono_literals;

namespace {

// The stand-in's thread ("loopback-pipes") by its voluntary context switches: how often it
// went to sleep, so how often it woke. -1 when it is not found.
long loopback_thread_sleeps() {
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm{task.path() / "comm"};
    std::string name;
    std::getline(comm, name);
    if (name != "loopback-pipes")
      continue;
    std::ifstream status{task.path() / "status"};
    for (std::string line; std::getline(status, line);)
      if (line.rfind("voluntary_ctxt_switches:", 0) == 0)
        return std::stol(line.substr(line.find(':') + 1));
  }
  return -1;
}

}  // namespace

TEST_CASE("loopback pipes: an idle stand-in sleeps, and still delivers and times out on time") {
  auto pipes = make_loopback_pipes(300ms);
  auto key = pipes->make_key();
  REQUIRE(key.ok());
  auto out = pipes->open_send(*key);
  auto in = pipes->open_receive(*key);
  REQUIRE(out.ok());
  REQUIRE(in.ok());

  // Idle: it polled every 1 ms before (about 200 wake-ups in these 200 ms).
  std::this_thread::sleep_for(20ms);
  long before = loopback_thread_sleeps();
  REQUIRE(before >= 0);
  std::this_thread::sleep_for(200ms);
  CHECK(loopback_thread_sleeps() - before <= 5);

  // A message still goes through at once (the call wakes the thread).
  auto bytes = std::make_shared<const std::vector<std::uint8_t>>(std::vector<std::uint8_t>{1, 2, 3, 4});
  std::vector<std::uint8_t> dest(4);
  std::promise<status> received;
  auto got = received.get_future();
  auto start = std::chrono::steady_clock::now();
  auto sequence = pipes->send(*out, bytes, {});
  REQUIRE(sequence.ok());
  pipes->receive(*in, *sequence, dest.data(), dest.size(), [&](status s) { received.set_value(std::move(s)); });
  REQUIRE(got.wait_for(5s) == std::future_status::ready);
  CHECK(got.get().ok());
  CHECK(dest == *bytes);
  CHECK(std::chrono::steady_clock::now() - start < 200ms);

  // A receive nobody sends for fails at its deadline (300 ms), not at the next 1 s look.
  std::promise<status> lost;
  auto failed = lost.get_future();
  start = std::chrono::steady_clock::now();
  pipes->receive(*in, *sequence + 1, dest.data(), dest.size(), [&](status s) { lost.set_value(std::move(s)); });
  REQUIRE(failed.wait_for(5s) == std::future_status::ready);
  auto waited = std::chrono::steady_clock::now() - start;
  CHECK_FALSE(failed.get().ok());
  CHECK(waited >= 300ms);
  CHECK(waited < 900ms);
}
