// tensor_link's pipe half (the row path of cluster transport "nccl") without a GPU: the same
// link code over transport::make_loopback_pipes, the in-process stand-in for NCCL's pipes with
// the same ordering and deadline rules. The link talks to its own node (sender and receiver
// are actors of this process), so every rule of the descriptor and sequence logic is
// exercised: rows packed and renumbered, sent on the pipe, the descriptor's sequence
// received into a pooled block, the message delivered again with its rows; receives posted
// out of order; a failed pipe falling back to rows in the message; forged or missing bytes
// dropped with no hang. The NCCL pipes themselves are tests/transport/nccl_channel (GPU) and
// tests/cluster/cuda_nccl (GPU, node processes).

#include <catch2/catch.hpp>

#include "actors/protocol.hpp"
#include "actors/tensor_link.hpp"
#include "transport/pipe_transport.hpp"

#include <caf/all.hpp>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

using namespace moert;
using namespace moert::actors;
using namespace std::chrono_literals;

namespace {

constexpr std::size_t row_floats = 6;

// What the receiving actor got (written on its thread, read by the test's).
struct inbox {
  std::mutex mutex;
  std::condition_variable changed;
  struct got {
    std::vector<std::vector<float>> routed_rows;  // rows[routes[i].row] for each route
    std::vector<std::uint32_t> slots;
  };
  std::vector<got> messages;
  std::size_t descriptors_seen = 0;

  bool wait_for(std::size_t n, std::chrono::milliseconds limit) {
    std::unique_lock lock{mutex};
    return changed.wait_for(lock, limit, [&] { return messages.size() >= n; });
  }
  std::size_t size() {
    std::lock_guard lock{mutex};
    return messages.size();
  }
};

std::shared_ptr<row_block> make_rows(std::size_t num_rows, float base) {
  auto block = std::make_shared<row_block>();
  block->row_floats = row_floats;
  block->data.resize(num_rows * row_floats);
  for (std::size_t i = 0; i < block->data.size(); ++i)
    block->data[i] = base + 0.25f * float(i);
  return block;
}

routed_tokens make_message(std::shared_ptr<row_block> rows, std::vector<std::uint32_t> route_rows) {
  routed_tokens msg;
  msg.rows = std::move(rows);
  for (std::size_t i = 0; i < route_rows.size(); ++i)
    msg.routes.push_back({route_rows[i], std::uint32_t(100 + i), 0, 0.5f});
  return msg;
}

// The rows each route names, as a receiver reads them.
std::vector<std::vector<float>> routed(const routed_tokens& msg) {
  std::vector<std::vector<float>> out;
  for (const auto& route : msg.routes)
    out.emplace_back(msg.rows->row(route.row), msg.rows->row(route.row) + msg.rows->row_floats);
  return out;
}

caf::behavior receiver(caf::event_based_actor* self, tensor_link* link, inbox* box) {
  return {
    [self, link, box](routed_tokens& msg) {
      bool had_descriptor = msg.wire.tag != 0;
      if (had_descriptor) {
        std::lock_guard lock{box->mutex};
        ++box->descriptors_seen;
      }
      if (link->fetch(self, msg))
        return;  // comes back with its rows
      inbox::got got;
      got.routed_rows = routed(msg);
      for (const auto& route : msg.routes)
        got.slots.push_back(route.slot);
      std::lock_guard lock{box->mutex};
      box->messages.push_back(std::move(got));
      box->changed.notify_all();
    },
  };
}

using ship_atom = caf::atom_constant<caf::atom("ship")>;
using forge_atom = caf::atom_constant<caf::atom("forge")>;

// Ships what the test hands it through the link (or, for forge, sends a descriptor as is).
caf::behavior sender(caf::event_based_actor* self, tensor_link* link, caf::actor dest) {
  return {
    [self, link, dest](ship_atom, routed_tokens& msg) {
      link->ship(self, dest, std::move(msg));
    },
    [self, dest](forge_atom, routed_tokens& msg) { self->send(dest, std::move(msg)); },
  };
}

}  // namespace

TEST_CASE("loopback pipes: receives posted out of order complete in sequence order", "[unit][transport]") {
  auto pipes = transport::make_loopback_pipes(2000ms);
  auto key = pipes->make_key();
  REQUIRE(key.ok());
  auto out = pipes->open_send(*key);
  auto in = pipes->open_receive(*key);
  REQUIRE(out.ok());
  REQUIRE(in.ok());
  std::mutex m;
  std::condition_variable cv;
  std::vector<std::string> order;
  std::vector<std::uint8_t> got0(3), got1(2);
  auto note = [&](std::string what) {
    return [&, what](status s) {
      std::lock_guard lock{m};
      order.push_back(what + (s.ok() ? "" : " failed: " + s.err().message));
      cv.notify_all();
    };
  };
  // The receive of message 1 first: it waits for message 0's.
  pipes->receive(*in, 1, got1.data(), 2, note("r1"));
  auto s0 = pipes->send(*out, std::make_shared<const std::vector<std::uint8_t>>(std::vector<std::uint8_t>{1, 2, 3}),
                        note("s0"));
  auto s1 = pipes->send(*out, std::make_shared<const std::vector<std::uint8_t>>(std::vector<std::uint8_t>{7, 8}),
                        note("s1"));
  REQUIRE(s0.ok());
  REQUIRE(s1.ok());
  CHECK(*s0 == 0);
  CHECK(*s1 == 1);
  std::this_thread::sleep_for(20ms);
  {
    std::lock_guard lock{m};
    CHECK(order.empty());  // nothing completes before message 0 is asked for
  }
  pipes->receive(*in, 0, got0.data(), 3, note("r0"));
  std::unique_lock lock{m};
  REQUIRE(cv.wait_for(lock, 2s, [&] { return order.size() == 4; }));
  CHECK(order == std::vector<std::string>{"s0", "r0", "s1", "r1"});
  CHECK(got0 == std::vector<std::uint8_t>{1, 2, 3});
  CHECK(got1 == std::vector<std::uint8_t>{7, 8});
}

TEST_CASE("loopback pipes: a receive nobody sends for fails its pipe at the deadline", "[unit][transport]") {
  auto pipes = transport::make_loopback_pipes(100ms);
  auto key = pipes->make_key();
  REQUIRE(key.ok());
  auto out = pipes->open_send(*key);
  auto in = pipes->open_receive(*key);
  REQUIRE((out.ok() && in.ok()));
  std::mutex m;
  std::condition_variable cv;
  std::string failure;
  bool done = false;
  std::uint8_t byte = 0;
  auto t0 = std::chrono::steady_clock::now();
  pipes->receive(*in, 0, &byte, 1, [&](status s) {
    std::lock_guard lock{m};
    done = true;
    failure = s.ok() ? "" : s.err().message;
    cv.notify_all();
  });
  std::unique_lock lock{m};
  REQUIRE(cv.wait_for(lock, 2s, [&] { return done; }));
  CHECK(failure.find("timed out") != std::string::npos);
  CHECK(std::chrono::steady_clock::now() - t0 >= 100ms);
  lock.unlock();
  // The pipe stays failed: a send is refused at once, naming why.
  auto late = pipes->send(*out, std::make_shared<const std::vector<std::uint8_t>>(1, 0), {});
  REQUIRE_FALSE(late.ok());
  CHECK(late.err().message.find("timed out") != std::string::npos);
}

TEST_CASE("tensor_link over pipes: rows cross by descriptor and sequence, bit for bit", "[actors][transport]") {
  // The link and the inbox outlive the actor system (its destructor waits for the actors).
  auto link = tensor_link::create_with_pipes(transport::make_loopback_pipes(1000ms));
  inbox box;
  caf::actor_system_config cfg;
  register_message_types(cfg);
  cfg.set("logger.verbosity", caf::atom("quiet"));
  caf::actor_system system{cfg};
  REQUIRE(link->uses_pipes());
  CHECK(link->address().empty());
  auto dest = system.spawn(receiver, link.get(), &box);
  CHECK_FALSE(link->remote(dest));  // no pipe to this node yet: rows would travel in the message
  auto key = link->open_send_to(system.node());
  REQUIRE(key.ok());
  REQUIRE(link->open_receive_from(system.node(), *key).ok());
  CHECK(link->remote(dest));
  CHECK_FALSE(link->open_send_to(system.node()).ok());  // one sending pipe per peer node
  auto from = system.spawn(sender, link.get(), dest);

  // Several messages in a row, each using a subset of its block's rows, one row twice.
  std::vector<std::vector<std::vector<float>>> want;
  for (int i = 0; i < 8; ++i) {
    auto msg = make_message(make_rows(5, float(i) * 10), {4, 1, 4, std::uint32_t(i % 5)});
    want.push_back(routed(msg));
    caf::anon_send(from, ship_atom::value, std::move(msg));
  }
  REQUIRE(box.wait_for(8, 5s));
  {
    std::lock_guard lock{box.mutex};
    CHECK(box.descriptors_seen == 8);
    for (std::size_t i = 0; i < 8; ++i) {
      INFO("message " << i);
      CHECK(box.messages[i].routed_rows == want[i]);
      CHECK(box.messages[i].slots == std::vector<std::uint32_t>{100, 101, 102, 103});
    }
  }
  CHECK(link->messages_shipped() == 8);
  // Only the rows the routes use travel: 2 or 3 distinct rows of 6 floats per message.
  CHECK(link->bytes_shipped() < 8 * 5 * row_floats * sizeof(float));
  CHECK(link->pipe_fallbacks() == 0);

  // A descriptor for a message that was never sent: its receive waits until the pipe's
  // deadline, then the pipe fails and the message is dropped (nothing hangs); rows shipped
  // after that travel in the CAF message.
  routed_tokens forged = make_message(nullptr, {0});
  forged.wire = {link->messages_shipped() + 1, 3 * row_floats * sizeof(float), row_floats};
  caf::anon_send(from, forge_atom::value, std::move(forged));
  std::this_thread::sleep_for(1500ms);
  CHECK(box.size() == 8);  // dropped
  auto msg = make_message(make_rows(3, 500), {2, 0});
  auto want_after = routed(msg);
  caf::anon_send(from, ship_atom::value, std::move(msg));
  REQUIRE(box.wait_for(9, 5s));
  {
    std::lock_guard lock{box.mutex};
    CHECK(box.messages[8].routed_rows == want_after);
  }
  CHECK(link->pipe_fallbacks() == 1);  // the failed pipe: rows in the CAF message

  caf::anon_send_exit(from, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(dest, caf::exit_reason::user_shutdown);
}

TEST_CASE("tensor_link over pipes: a cancelled peer's rows travel in the message", "[actors][transport]") {
  auto link = tensor_link::create_with_pipes(transport::make_loopback_pipes(1000ms));
  inbox box;
  caf::actor_system_config cfg;
  register_message_types(cfg);
  cfg.set("logger.verbosity", caf::atom("quiet"));
  caf::actor_system system{cfg};
  auto dest = system.spawn(receiver, link.get(), &box);
  auto key = link->open_send_to(system.node());
  REQUIRE(key.ok());
  REQUIRE(link->open_receive_from(system.node(), *key).ok());
  auto from = system.spawn(sender, link.get(), dest);
  link->cancel_peer(system.node(), "node lost (test)");
  std::this_thread::sleep_for(50ms);  // the cancel is applied on the pipes' thread
  auto msg = make_message(make_rows(4, 1), {3, 3, 0});
  auto want = routed(msg);
  caf::anon_send(from, ship_atom::value, std::move(msg));
  REQUIRE(box.wait_for(1, 5s));
  {
    std::lock_guard lock{box.mutex};
    CHECK(box.descriptors_seen == 0);
    CHECK(box.messages[0].routed_rows == want);
  }
  CHECK(link->pipe_fallbacks() == 1);
  caf::anon_send_exit(from, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(dest, caf::exit_reason::user_shutdown);
}
