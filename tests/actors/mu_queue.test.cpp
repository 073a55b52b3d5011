// The μ-queue of one expert device with one actor per routed expert (issue [E] part 1): it
// hands each drained queue to that expert's actor, keeps at most two batches in flight on the
// device until an expert says it is done, and when an expert moves away (adopt on the target,
// hand_off on the source) it forwards the expert's queued rows, and rows that still reach it,
// to the device that hosts the expert now, so none is lost or handed twice.
#include <catch2/catch.hpp>

#include "actors/mu_queue.hpp"
#include "actors/protocol.hpp"
#include "actors/runtime.hpp"
#include "model/config.hpp"

#include <caf/all.hpp>

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <tuple>
#include <vector>

using namespace moert;
using namespace moert::actors;

namespace {

const char* tiny_model = R"({"model_type": "qwen2_moe", "vocab_size": 64, "hidden_size": 16,
  "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "num_experts": 4,
  "num_experts_per_tok": 2, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 12,
  "intermediate_size": 24, "norm_topk_prob": false})";

constexpr auto wait_limit = std::chrono::seconds{5};
using release_atom = caf::atom_constant<caf::atom("release")>;

// What the stand-in experts were handed (written on actor threads, read by the test).
struct handed_log {
  struct batch {
    std::uint32_t expert, device, layer;
    std::vector<std::uint32_t> slots;
  };
  std::mutex mutex;
  std::vector<batch> batches;
  std::size_t count() {
    std::lock_guard<std::mutex> guard{mutex};
    return batches.size();
  }
};

// Holds each batch until told to release, then answers expert_done for it, as an expert does
// once its device ran it.
caf::behavior stand_in_expert(caf::event_based_actor* self, std::shared_ptr<handed_log> log) {
  auto held = std::make_shared<std::vector<std::pair<caf::actor, std::uint32_t>>>();
  return {
    [=](expert_batch& b) {
      handed_log::batch seen{b.expert, b.device, b.layer, {}};
      for (const queued_row& row : b.items)
        seen.slots.push_back(row.slot);
      {
        std::lock_guard<std::mutex> guard{log->mutex};
        log->batches.push_back(std::move(seen));
      }
      held->emplace_back(caf::actor_cast<caf::actor>(self->current_sender()), b.expert);
    },
    [=](release_atom) {
      for (auto& [queue, expert] : *held)
        self->send(queue, expert_done_atom::value, expert);
      held->clear();
    },
  };
}

template <class Pred>
bool wait_until(Pred pred) {
  auto deadline = std::chrono::steady_clock::now() + wait_limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline)
      return false;
    std::this_thread::sleep_for(std::chrono::milliseconds{1});
  }
  return true;
}

struct queue_fixture {
  runtime_stats stats;
  runtime_context ctx;
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> system;
  std::shared_ptr<handed_log> log = std::make_shared<handed_log>();
  std::vector<caf::actor> experts, queues;
  caf::actor shard;  // the reply_to of every row: never hears anything here

  queue_fixture() {
    auto parsed = model::parse_config(tiny_model, "mu_queue test model");
    REQUIRE(parsed.ok());
    ctx.config = *parsed;
    ctx.num_expert_devices = 2;
    ctx.stats = &stats;
    ctx.placement = std::make_shared<expert_placement>(4, 2);
    cfg.set("logger.verbosity", caf::atom("quiet"));
    system = std::make_unique<caf::actor_system>(cfg);
    for (std::size_t e = 0; e < 4; ++e)
      experts.push_back(system->spawn(stand_in_expert, log));
    shard = system->spawn([](caf::event_based_actor*, int) -> caf::behavior { return {[](const caf::message&) {}}; },
                          0);
    scheduler_update scheduler;
    scheduler.params.max_wait = std::chrono::nanoseconds{0};
    for (std::size_t d = 0; d < 2; ++d) {
      std::map<std::uint32_t, caf::actor> hosted;
      for (std::uint32_t e : ctx.hosted_by(d))
        hosted[e] = experts[e];
      queues.push_back(system->spawn<mu_queue>(&ctx, d, scheduler, "expert " + std::to_string(d), hosted));
    }
    for (const auto& q : queues)
      caf::anon_send(q, peers_atom::value, queues);
  }

  ~queue_fixture() {
    for (const auto& a : experts)
      caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
    for (const auto& a : queues)
      caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(shard, caf::exit_reason::user_shutdown);
    experts.clear();
    queues.clear();
    shard = nullptr;
    system->await_all_actors_done();
  }

  // One A2E of layer `layer` to device `d`: row i goes to experts[i] with join slot slots[i].
  void a2e(std::size_t d, std::uint32_t layer, const std::vector<std::uint32_t>& to,
           const std::vector<std::uint32_t>& slots, std::uint32_t micro_batch = 0) {
    routed_tokens msg;
    msg.key = {0, 1, micro_batch, layer};
    auto rows = std::make_shared<row_block>();
    rows->row_floats = std::size_t(ctx.config.hidden_size);
    rows->data.assign(to.size() * rows->row_floats, 0.5f);
    msg.rows = rows;
    for (std::size_t i = 0; i < to.size(); ++i)
      msg.routes.push_back({std::uint32_t(i), slots[i], to[i], 1.0f});
    msg.reply_to = shard;
    caf::anon_send(queues[d], std::move(msg));
  }

  void release_all() {
    for (const auto& e : experts)
      caf::anon_send(e, release_atom::value);
  }
};

}  // namespace

TEST_CASE("a μ-queue hands each batch to its expert's actor, two in flight per device") {
  queue_fixture f;
  // Device 0 hosts experts 0 and 2: four non-empty queues (2 layers × 2 experts).
  f.a2e(0, 0, {0, 0, 2}, {0, 1, 2});
  f.a2e(0, 1, {2, 0, 0}, {3, 4, 5});
  REQUIRE(wait_until([&] { return f.log->count() >= 2; }));
  std::this_thread::sleep_for(std::chrono::milliseconds{50});
  CHECK(f.log->count() == 2);  // nobody said done yet
  f.release_all();
  REQUIRE(wait_until([&] { return f.log->count() >= 4; }));
  std::this_thread::sleep_for(std::chrono::milliseconds{20});
  std::lock_guard<std::mutex> guard{f.log->mutex};
  CHECK(f.log->batches.size() == 4);
  std::set<std::uint32_t> slots;
  for (const auto& b : f.log->batches) {
    CHECK(b.device == 0);
    CHECK((b.expert == 0 || b.expert == 2));
    slots.insert(b.slots.begin(), b.slots.end());
  }
  CHECK(slots == std::set<std::uint32_t>{0, 1, 2, 3, 4, 5});
  CHECK(f.stats.control_messages() == 0);  // the stand-ins do not count; the real expert does
}

namespace {

// Two layer-1 batches of an earlier step fill device 0 (it hosts experts 0 and 2). Then one row
// for expert 0 at layer 0 (micro-batch `first_mb`) arrives 5 ms before three rows for expert 2
// at `later_layer` (micro-batch `later_mb`). Once one batch has room, the older single row must
// go first, then the three.
void check_oldest_row_goes_first(std::uint32_t first_mb, std::uint32_t later_layer, std::uint32_t later_mb) {
  queue_fixture f;
  f.a2e(0, 1, {0}, {0});
  f.a2e(0, 1, {2}, {1});
  REQUIRE(wait_until([&] { return f.log->count() >= 2; }));
  f.a2e(0, 0, {0}, {10}, first_mb);
  std::this_thread::sleep_for(std::chrono::milliseconds{5});
  f.a2e(0, later_layer, {2, 2, 2}, {11, 12, 13}, later_mb);
  std::this_thread::sleep_for(std::chrono::milliseconds{20});
  REQUIRE(f.log->count() == 2);
  caf::anon_send(f.experts[2], release_atom::value);  // room for one batch
  REQUIRE(wait_until([&] { return f.log->count() >= 3; }));
  {
    std::lock_guard<std::mutex> guard{f.log->mutex};
    CHECK(f.log->batches[2].expert == 0);
    CHECK(f.log->batches[2].layer == 0);
    CHECK(f.log->batches[2].slots == std::vector<std::uint32_t>{10});
  }
  f.release_all();
  REQUIRE(wait_until([&] { return f.log->count() >= 4; }));
  std::lock_guard<std::mutex> guard{f.log->mutex};
  CHECK(f.log->batches[3].expert == 2);
  CHECK(f.log->batches[3].layer == later_layer);
  CHECK(f.log->batches[3].slots == std::vector<std::uint32_t>{11, 12, 13});
}

}  // namespace

// Decode overlap at r1 = 2: micro-batch 0's rows of a layer reach the device before micro-batch
// 1's. Its queue goes first although micro-batch 1's holds more rows, so micro-batch 0 can start
// its next attention while the device serves micro-batch 1.
TEST_CASE("a μ-queue serves the micro-batch that reached a layer first before a later, larger one") {
  check_oldest_row_goes_first(0, 0, 1);
}

// Decode overlap at r1 = 2 once the micro-batches drifted a layer apart: micro-batch 1's last
// rows of layer 0 wait while micro-batch 0's rows of layer 1, more of them, arrive. Micro-batch
// 1's go first, so it starts its layer-1 attention and its rows of layer 1 can join micro-batch
// 0's in the same batches; by the layer score the device would serve layer 1 first.
TEST_CASE("a μ-queue serves the oldest rows first, even of an earlier layer with fewer rows") {
  check_oldest_row_goes_first(1, 1, 0);
}

TEST_CASE("moving an expert forwards its queued and late rows to its new device, each handed once") {
  queue_fixture f;
  // Two batches of expert 0 fill device 0; then expert 2's rows wait in its queues.
  f.a2e(0, 0, {0, 0, 0}, {0, 1, 2});
  f.a2e(0, 1, {0, 0, 0}, {4, 5, 6});
  REQUIRE(wait_until([&] { return f.log->count() >= 2; }));
  f.a2e(0, 0, {2}, {3});
  f.a2e(0, 1, {2}, {7});
  std::this_thread::sleep_for(std::chrono::milliseconds{50});
  {
    std::lock_guard<std::mutex> guard{f.log->mutex};
    REQUIRE(f.log->batches.size() == 2);
    for (const auto& b : f.log->batches)
      REQUIRE(b.expert == 0);
  }
  // The supervisor's order: adopt on the target, move the placement, hand off on the source.
  caf::anon_send(f.queues[1], adopt_expert_atom::value, std::uint32_t{2}, f.experts[2]);
  f.ctx.placement->move(2, 1);
  caf::anon_send(f.queues[0], hand_off_atom::value, std::uint32_t{2});
  // A shard that read the placement before the move: its row still goes to device 0.
  f.a2e(0, 0, {2}, {8});
  auto expert2_slots = [&] {
    std::lock_guard<std::mutex> guard{f.log->mutex};
    std::multiset<std::uint32_t> slots;
    for (const auto& b : f.log->batches)
      if (b.expert == 2)
        slots.insert(b.slots.begin(), b.slots.end());
    return slots;
  };
  REQUIRE(wait_until([&] {
    f.release_all();
    return expert2_slots().size() >= 3;
  }));
  std::this_thread::sleep_for(std::chrono::milliseconds{50});
  f.release_all();
  std::this_thread::sleep_for(std::chrono::milliseconds{20});
  CHECK(expert2_slots() == std::multiset<std::uint32_t>{3, 7, 8});  // each once
  {
    std::lock_guard<std::mutex> guard{f.log->mutex};
    for (const auto& b : f.log->batches)
      if (b.expert == 2)
        CHECK(b.device == 1);  // handed by its new device's queue
  }
  CHECK(f.stats.forwarded_rows() == 3);
  CHECK(f.ctx.hosted_by(1) == std::vector<std::uint32_t>{1, 2, 3});
}
