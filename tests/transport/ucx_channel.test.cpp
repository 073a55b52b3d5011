#include <catch2/catch.hpp>

#include "transport/ucx_channel.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <span>
#include <thread>
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

bool same_bytes(std::span<const std::uint8_t> got, const std::vector<std::uint8_t>& want) {
  return std::equal(got.begin(), got.end(), want.begin(), want.end());
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
        CHECK(same_bytes(outcome->bytes(), *sent));
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
  CHECK(same_bytes(outcome->bytes(), *sent));
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

TEST_CASE("receive_into: bytes already here complete inside the call, later ones through the callback") {
  for (auto transport : {ucx_transport::tcp, ucx_transport::posix}) {
    DYNAMIC_SECTION(to_string(transport)) {
      pair_of_channels channels{{.transport = transport, .eager_limit_bytes = 64 << 10}};

      // Eager (under the limit), sent before the receive: the bytes wait in UCX, and the
      // receive finds them inside the call, without the channel thread.
      auto early = pattern(60000, 3);
      std::promise<status> early_sent;
      auto early_done = early_sent.get_future();
      channels.a->send(channels.a_to_b, 71, early, [&](status s) { early_sent.set_value(std::move(s)); });
      CHECK(wait_for(early_done).ok());
      std::this_thread::sleep_for(50ms);
      {
        auto credit = channels.b->reserve(early->size());
        REQUIRE(credit.ok());
        CHECK(channels.b->pool_bytes_in_use() == early->size());
        auto dest = std::make_shared<std::vector<std::uint8_t>>(early->size());
        bool called = false;
        auto started = channels.b->receive_into(channels.b_to_a, 71, dest->data(), dest->size(), dest,
                                                [&](status) { called = true; });
        INFO((started.ok() ? std::string{} : started.err().message));
        REQUIRE(started.ok());
        CHECK(*started);
        CHECK(*dest == *early);
        CHECK_FALSE(called);
      }
      CHECK(channels.b->pool_bytes_in_use() == 0);

      // Rendezvous (over the limit), receive posted first: pending, then the callback.
      auto late = pattern(300000, 5);
      auto dest = std::make_shared<std::vector<std::uint8_t>>(late->size());
      std::promise<status> received;
      auto got = received.get_future();
      auto started = channels.b->receive_into(channels.b_to_a, 72, dest->data(), dest->size(), dest,
                                              [&](status s) { received.set_value(std::move(s)); });
      REQUIRE(started.ok());
      CHECK_FALSE(*started);
      std::promise<status> late_sent;
      auto late_done = late_sent.get_future();
      channels.a->send(channels.a_to_b, 72, late, [&](status s) { late_sent.set_value(std::move(s)); });
      CHECK(wait_for(got).ok());
      CHECK(wait_for(late_done).ok());
      CHECK(*dest == *late);

      // More bytes than announced: an error, in the call or through the callback.
      channels.a->send(channels.a_to_b, 73, pattern(2000, 1), {});
      std::this_thread::sleep_for(50ms);
      auto small = std::make_shared<std::vector<std::uint8_t>>(1000);
      std::promise<status> refused;
      auto refusal = refused.get_future();
      auto short_one = channels.b->receive_into(channels.b_to_a, 73, small->data(), small->size(), small,
                                                [&](status s) { refused.set_value(std::move(s)); });
      if (short_one.ok()) {
        REQUIRE_FALSE(*short_one);
        CHECK_FALSE(wait_for(refusal).ok());
      }
    }
  }
}

TEST_CASE("receive buffers come back to the pool and are reused") {
  pair_of_channels channels{{.transport = ucx_transport::posix}};
  const std::uint8_t* first = nullptr;
  for (int round = 0; round < 3; ++round) {
    auto sent = pattern(100000, static_cast<std::uint8_t>(round));
    std::promise<result<received_buffer>> received;
    auto got = received.get_future();
    channels.b->receive(channels.b_to_a, 500 + round, sent->size(),
                        [&](result<received_buffer> r) { received.set_value(std::move(r)); });
    channels.a->send(channels.a_to_b, 500 + round, sent, {});
    auto outcome = wait_for(got);
    REQUIRE(outcome.ok());
    CHECK(same_bytes(outcome->bytes(), *sent));
    if (round == 0)
      first = outcome->data();
    else
      CHECK(outcome->data() == first);  // the same buffer again: no allocation, no zero fill
  }
  CHECK(channels.b->pool_bytes_in_use() == 0);
}

TEST_CASE("of equal free receive buffers, the one given back last is reused first (the warmest)") {
  pair_of_channels channels{{.transport = ucx_transport::posix}};
  auto receive_one = [&](std::uint64_t tag) {
    auto sent = pattern(100000, static_cast<std::uint8_t>(tag));
    std::promise<result<received_buffer>> received;
    auto got = received.get_future();
    channels.b->receive(channels.b_to_a, tag, sent->size(),
                        [&](result<received_buffer> r) { received.set_value(std::move(r)); });
    channels.a->send(channels.a_to_b, tag, sent, {});
    auto outcome = wait_for(got);
    REQUIRE(outcome.ok());
    CHECK(same_bytes(outcome->bytes(), *sent));
    return std::move(*outcome);
  };
  // Three buffers held at once, given back in the order 0, 1, 2.
  std::vector<received_buffer> held;
  for (std::uint64_t tag = 600; tag < 603; ++tag)
    held.push_back(receive_one(tag));
  std::vector<const std::uint8_t*> given_back;
  for (auto& buffer : held) {
    given_back.push_back(buffer.data());
    buffer = {};
  }
  CHECK(receive_one(603).data() == given_back[2]);
  CHECK(receive_one(604).data() == given_back[2]);  // back again before the next receive
  CHECK(channels.b->pool_bytes_in_use() == 0);
}

TEST_CASE("poll: a caller that drives the channel itself sees its transfers through, callbacks inside poll()") {
  for (auto transport : {ucx_transport::tcp, ucx_transport::posix}) {
    DYNAMIC_SECTION(to_string(transport)) {
      // A window longer than the test: the setup below (1 MiB buffers, page faults) can take
      // over 10 ms on a loaded machine, and the channel thread would take over meanwhile (a
      // CI run saw every callback there). Regression for that flake.
      pair_of_channels channels{
          {.transport = transport, .eager_limit_bytes = 64 << 10, .caller_poll_window = std::chrono::seconds{30}}};
      auto main_thread = std::this_thread::get_id();
      std::atomic<bool> in_poll{false};
      // A callback that ran on this thread outside poll() breaks the contract (never inside
      // send or receive_into). While a caller polls, the channel thread leaves the worker to
      // it, so the callbacks run inside poll(): a poll() that did nothing would leave them
      // all to the channel thread.
      std::atomic<int> done{0}, misplaced{0}, failed{0}, in_caller_poll{0};
      auto record = [&](status s) {
        if (std::this_thread::get_id() == main_thread)
          ++(in_poll ? in_caller_poll : misplaced);
        if (!s.ok())
          ++failed;
        ++done;
      };
      channels.a->poll();  // this thread drives from now on
      channels.b->poll();
      // Rendezvous (over the eager limit) and eager messages, receives posted first.
      constexpr int messages = 8;
      std::vector<std::shared_ptr<std::vector<std::uint8_t>>> dests;
      std::vector<std::shared_ptr<const std::vector<std::uint8_t>>> sent;
      int completed_inline = 0;
      for (int i = 0; i < messages; ++i) {
        std::size_t bytes = i % 2 ? 4096 : (1 << 20);
        sent.push_back(pattern(bytes, std::uint8_t(i)));
        dests.push_back(std::make_shared<std::vector<std::uint8_t>>(bytes));
        auto started = channels.b->receive_into(channels.b_to_a, 500 + i, dests.back()->data(), bytes, dests.back(),
                                                record);
        REQUIRE(started.ok());
        completed_inline += *started ? 1 : 0;
      }
      for (int i = 0; i < messages; ++i)
        channels.a->send(channels.a_to_b, 500 + i, sent[i], record);
      auto deadline = std::chrono::steady_clock::now() + 10s;
      while (done + completed_inline < 2 * messages && std::chrono::steady_clock::now() < deadline) {
        in_poll = true;
        channels.a->poll();
        channels.b->poll();
        in_poll = false;
      }
      REQUIRE(done + completed_inline == 2 * messages);
      CHECK(failed == 0);
      CHECK(misplaced == 0);
      CHECK(in_caller_poll == done);
      for (int i = 0; i < messages; ++i)
        CHECK(*dests[i] == *sent[i]);
    }
  }
}

TEST_CASE("an idle channel's thread does not wake for arriving bytes; their receives find them inside the call") {
  for (auto transport : {ucx_transport::tcp, ucx_transport::posix}) {
    DYNAMIC_SECTION(to_string(transport)) {
      pair_of_channels channels{{.transport = transport}};
      std::this_thread::sleep_for(20ms);  // both threads asleep, nothing pending
      constexpr int messages = 48;
      auto sent = pattern(4096, 9);
      auto before = channels.b->thread_wakeups();
      for (int i = 0; i < messages; ++i) {
        channels.a->send(channels.a_to_b, 900 + i, sent, {});
        std::this_thread::sleep_for(1ms);  // apart, so that an armed thread would wake for each
      }
      std::this_thread::sleep_for(20ms);
      // Armed, the thread woke for arrivals (measured: dozens here); unarmed, only its
      // periodic look (every 100 ms) falls in the window.
      CHECK(channels.b->thread_wakeups() - before <= 5);
      int inline_count = 0;
      for (int i = 0; i < messages; ++i) {
        auto dest = std::make_shared<std::vector<std::uint8_t>>(sent->size());
        std::promise<status> received;
        auto got = received.get_future();
        auto started = channels.b->receive_into(channels.b_to_a, 900 + i, dest->data(), dest->size(), dest,
                                                [&](status s) { received.set_value(std::move(s)); });
        REQUIRE(started.ok());
        if (*started)
          ++inline_count;
        else
          REQUIRE(wait_for(got).ok());
        CHECK(*dest == *sent);
      }
      // Most are found inside the call (a tcp message whose tail is still in the socket
      // completes through the callback: seen once in five runs, 47 of 48).
      CHECK(inline_count >= messages * 3 / 4);
    }
  }
}
