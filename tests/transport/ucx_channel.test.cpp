#include <catch2/catch.hpp>

#include "transport/ucx_channel.hpp"

#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <numeric>

using namespace moert;
using namespace moert::transport;
using namespace std::chrono_literals;

namespace {

std::shared_ptr<const std::vector<std::uint8_t>> pattern(std::size_t bytes, std::uint8_t seed) {
  auto data = std::make_shared<std::vector<std::uint8_t>>(bytes);
  for (std::size_t i = 0; i < bytes; ++i)
    (*data)[i] = static_cast<std::uint8_t>(seed + i * 131 + (i >> 8));
  return data;
}

template <class T>
T wait_for(std::future<T>& future) {
  REQUIRE(future.wait_for(10s) == std::future_status::ready);
  return future.get();
}

struct pair_of_channels {
  std::unique_ptr<ucx_channel> a, b;
  peer_id a_to_b = 0, b_to_a = 0;
  explicit pair_of_channels(ucx_channel_config config) {
    auto made_a = ucx_channel::create(config);
    REQUIRE(made_a.ok());
    auto made_b = ucx_channel::create(config);
    REQUIRE(made_b.ok());
    a = std::move(*made_a);
    b = std::move(*made_b);
    auto ab = a->connect(b->address());
    REQUIRE(ab.ok());
    auto ba = b->connect(a->address());
    REQUIRE(ba.ok());
    a_to_b = *ab;
    b_to_a = *ba;
  }
};

}  // namespace

TEST_CASE("tensor bytes arrive whole over tcp and posix shared memory") {
  for (auto transport : {ucx_transport::tcp, ucx_transport::posix}) {
    DYNAMIC_SECTION(to_string(transport)) {
      pair_of_channels channels{{.transport = transport}};
      for (std::size_t bytes : {std::size_t{1}, std::size_t{4096}, std::size_t{65536}, std::size_t{1} << 20}) {
        auto sent = pattern(bytes, static_cast<std::uint8_t>(bytes));
        std::promise<result<received_buffer>> received;
        std::promise<status> delivered;
        auto got = received.get_future();
        auto done = delivered.get_future();
        channels.b->receive(channels.b_to_a, 1000 + bytes, bytes,
                            [&](result<received_buffer> r) { received.set_value(std::move(r)); });
        channels.a->send(channels.a_to_b, 1000 + bytes, sent, [&](status s) { delivered.set_value(std::move(s)); });
        auto outcome = wait_for(got);
        INFO((outcome.ok() ? std::string{} : outcome.err().message) << " at " << bytes);
        REQUIRE(outcome.ok());
        CHECK(outcome->bytes() == *sent);
        CHECK(wait_for(done).ok());
        CHECK(channels.b->pool_bytes_in_use() == bytes);  // held while the buffer lives
      }
      CHECK(channels.b->pool_bytes_in_use() == 0);
    }
  }
}

TEST_CASE("a message sent before its receive is posted is still delivered") {
  pair_of_channels channels{{.transport = ucx_transport::tcp}};
  auto sent = pattern(300000, 7);
  std::promise<status> delivered;
  auto done = delivered.get_future();
  channels.a->send(channels.a_to_b, 42, sent, [&](status s) { delivered.set_value(std::move(s)); });
  std::this_thread::sleep_for(50ms);
  std::promise<result<received_buffer>> received;
  auto got = received.get_future();
  channels.b->receive(channels.b_to_a, 42, sent->size(), [&](result<received_buffer> r) { received.set_value(std::move(r)); });
  auto outcome = wait_for(got);
  REQUIRE(outcome.ok());
  CHECK(outcome->bytes() == *sent);
  CHECK(wait_for(done).ok());
}

TEST_CASE("announced sizes are checked before anything is allocated") {
  ucx_channel_config config{.transport = ucx_transport::tcp,
                            .max_message_bytes = 1 << 20,
                            .pool_bytes = 2 << 20};
  pair_of_channels channels{config};
  std::promise<result<received_buffer>> huge;
  auto got = huge.get_future();
  channels.b->receive(channels.b_to_a, 1, std::size_t{4} << 30, [&](result<received_buffer> r) { huge.set_value(std::move(r)); });
  auto outcome = wait_for(got);
  REQUIRE_FALSE(outcome.ok());
  CHECK_THAT(outcome.err().message, Catch::Contains("4294967296 bytes announced"));
  CHECK(channels.b->pool_bytes_in_use() == 0);

  // The pool bounds what is held at once: two pending 1 MiB receives fit, a third does not.
  std::vector<std::future<result<received_buffer>>> pending;
  std::vector<std::promise<result<received_buffer>>> promises(3);
  for (int i = 0; i < 3; ++i) {
    pending.push_back(promises[i].get_future());
    channels.b->receive(channels.b_to_a, 100 + i, 1 << 20,
                        [&, i](result<received_buffer> r) { promises[i].set_value(std::move(r)); }, 200ms);
  }
  auto third = wait_for(pending[2]);
  REQUIRE_FALSE(third.ok());
  CHECK_THAT(third.err().message, Catch::Contains("pool full"));
  // The first two time out (nobody sends) and give their bytes back.
  CHECK_FALSE(wait_for(pending[0]).ok());
  CHECK_FALSE(wait_for(pending[1]).ok());
  // The bytes come back once UCX has finished cancelling (it still owns them until then).
  auto deadline = std::chrono::steady_clock::now() + 2s;
  while (channels.b->pool_bytes_in_use() != 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(1ms);
  CHECK(channels.b->pool_bytes_in_use() == 0);
}

TEST_CASE("a receive nobody answers times out, and cancel_peer fails pending receives at once") {
  pair_of_channels channels{{.transport = ucx_transport::posix}};
  std::promise<result<received_buffer>> timed;
  auto timed_out = timed.get_future();
  auto start = std::chrono::steady_clock::now();
  channels.b->receive(channels.b_to_a, 5, 64, [&](result<received_buffer> r) { timed.set_value(std::move(r)); }, 100ms);
  auto outcome = wait_for(timed_out);
  auto waited = std::chrono::steady_clock::now() - start;
  REQUIRE_FALSE(outcome.ok());
  CHECK_THAT(outcome.err().message, Catch::Contains("timed out"));
  CHECK(waited >= 100ms);
  CHECK(waited < 2s);

  std::promise<result<received_buffer>> cancelled;
  auto got = cancelled.get_future();
  channels.b->receive(channels.b_to_a, 6, 64, [&](result<received_buffer> r) { cancelled.set_value(std::move(r)); }, 60s);
  channels.b->cancel_peer(channels.b_to_a, "node e0 is down");
  auto failure = wait_for(got);
  REQUIRE_FALSE(failure.ok());
  CHECK_THAT(failure.err().message, Catch::Contains("node e0 is down"));
}

TEST_CASE("a sender that sends fewer bytes than announced is an error, not a short buffer") {
  pair_of_channels channels{{.transport = ucx_transport::tcp}};
  std::promise<result<received_buffer>> received;
  auto got = received.get_future();
  channels.b->receive(channels.b_to_a, 9, 1000, [&](result<received_buffer> r) { received.set_value(std::move(r)); });
  channels.a->send(channels.a_to_b, 9, pattern(10, 1), [](status) {});
  auto outcome = wait_for(got);
  CHECK_FALSE(outcome.ok());
}

TEST_CASE("a peer address that is not one is refused") {
  auto channel = ucx_channel::create({.transport = ucx_transport::tcp});
  REQUIRE(channel.ok());
  CHECK_FALSE((*channel)->connect("").ok());
  CHECK_FALSE((*channel)->connect(std::string(1 << 20, 'x')).ok());
}
