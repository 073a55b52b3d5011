// Defects of issue [E] at the actor level, each a regression test written before its fix:
//   - a device task that throws used to escape the device thread (std::terminate: the whole
//     process died); now its error comes back to whoever posted it, and the device runs on;
//   - an attention shard that exits while its device task is queued used to free the state
//     the task reads (batches, KV caches) in on_exit: a use-after-free on the device thread
//     (ASan reports it; the Release build may not notice), now that state lives as long as
//     the task;
//   - an attention task that throws makes its shard exit with the task and the cause as the
//     reason, for its supervisor to hear.
#include <catch2/catch.hpp>

#include "actors/attention_shard.hpp"
#include "actors/completion.hpp"
#include "actors/device.hpp"
#include "actors/protocol.hpp"
#include "actors/runtime.hpp"
#include "model/config.hpp"
#include "model/weights.hpp"

#include <caf/all.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace moert;
using namespace moert::actors;

namespace {

const char* tiny_model = R"({"model_type": "qwen2_moe", "vocab_size": 64, "hidden_size": 16,
  "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "num_experts": 4,
  "num_experts_per_tok": 2, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 12,
  "intermediate_size": 24, "mlp_only_layers": [1], "norm_topk_prob": false})";

constexpr auto wait_limit = std::chrono::seconds{5};

// Holds `dev` with an ordinary task until the returned promise is set, so that the concurrent
// tasks posted meanwhile are queued together when it ends (and the lanes pull them).
std::promise<void> hold(device& dev) {
  std::promise<void> release;
  dev.post("gate", [gate = release.get_future().share()](gpu::backend&) { gate.wait_for(wait_limit); });
  return release;
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

// One shard on a device the test controls, with actors that swallow what it sends.
struct shard_fixture {
  runtime_stats stats;
  runtime_context ctx;
  device dev{"attention 0", 1, nullptr};
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> system;
  caf::actor sink_actor;  // stands in for the ingress and the μ-queue
  caf::actor shard;

  shard_fixture() {
    auto parsed = model::parse_config(tiny_model, "supervision test model");
    REQUIRE(parsed.ok());
    ctx.config = *parsed;
    ctx.weights = std::make_shared<const model::model_weights>(model::synthetic_weights(*parsed, 3));
    ctx.num_expert_devices = 1;
    ctx.stats = &stats;
    cfg.set("logger.verbosity", caf::atom("quiet"));
    system = std::make_unique<caf::actor_system>(cfg);
    // The unused argument: CAF 0.17 binds a null tuple when a function actor takes none
    // (UBSan: "reference binding to null pointer" in init_fun_factory).
    sink_actor = system->spawn(
        [](caf::event_based_actor*, int) -> caf::behavior {
          return {[](const caf::message&) {}};  // never answers: the shard waits, which is fine here
        },
        0);
    policy::execution_plan plan{1, 0, 1, policy::segment_order::asas};
    shard = system->spawn<attention_shard>(&ctx, std::uint32_t{0}, &dev, std::vector<caf::actor>{sink_actor},
                                           sink_actor, plan);
  }

  ~shard_fixture() {
    caf::anon_send_exit(shard, caf::exit_reason::user_shutdown);
    caf::anon_send_exit(sink_actor, caf::exit_reason::user_shutdown);
    shard = nullptr;
    sink_actor = nullptr;
    system->await_all_actors_done();
    dev.drain(wait_limit);
  }

  void admit(std::uint64_t id) {
    admit_request request;
    request.request_id = id;
    request.prompt = {3, 17, 40};
    request.max_new_tokens = 4;
    caf::anon_send(shard, std::move(request));
  }

  // Waits for the shard's down message; its reason rendered, or "" on timeout.
  std::string await_down() {
    caf::scoped_actor self{*system};
    self->monitor(shard);
    std::string reason;
    self->receive([&](caf::down_msg& down) { reason = system->render(down.reason); },
                  caf::after(wait_limit) >> [] {});
    return reason;
  }
};

// Records the thread that handles its message, then passes the message on to `next` (if set).
// A device_runnable actor: a task's completion may run it on the device thread.
class thread_probe : public caf::event_based_actor, public device_runnable {
public:
  thread_probe(caf::actor_config& cfg, std::promise<std::thread::id>* where, caf::actor next)
      : caf::event_based_actor(cfg), where_(where), next_(std::move(next)) {}

  caf::behavior make_behavior() override {
    return {[this](int hop) {
      where_->set_value(std::this_thread::get_id());
      if (next_)
        send(next_, hop + 1);
    }};
  }

private:
  std::promise<std::thread::id>* where_;
  caf::actor next_;
};

}  // namespace

TEST_CASE("a task's completion runs a device_runnable actor on the device's threads, others on CAF's workers") {
  // Each hop of a decode step used to wake one of CAF's sleeping workers (20-100 µs on 2
  // cores); the shard, μ-queue and expert actors now run where their completion lands.
  device dev{"device 0", 2, nullptr};
  dev.set_actors_inline(true);
  caf::actor_system_config cfg;
  cfg.set("logger.verbosity", caf::atom("quiet"));
  cfg.set("scheduler.max-threads", 2);
  caf::actor_system system{cfg};
  std::promise<std::thread::id> second_hop, first_hop, lane_hop, plain_hop;
  // A device_runnable actor that a device_runnable actor messages runs on the device too.
  // lazy_init: else a CAF worker that is still starting the actor when the message lands
  // handles it there.
  caf::actor second = system.spawn<thread_probe, caf::lazy_init>(&second_hop, caf::actor{});
  caf::actor first = system.spawn<thread_probe, caf::lazy_init>(&first_hop, second);
  caf::actor from_lane = system.spawn<thread_probe, caf::lazy_init>(&lane_hop, caf::actor{});
  // Not device_runnable: CAF's scheduler runs it, as for caf::anon_send.
  caf::actor plain = system.spawn(
      [&plain_hop](caf::event_based_actor*, int) -> caf::behavior {
        return {[&plain_hop](int) { plain_hop.set_value(std::this_thread::get_id()); }};
      },
      0);
  std::thread::id device_thread;  // written by the first task, read by the later ones (FIFO)
  dev.post("attention L0 mb0", [&](gpu::backend&) {
    device_thread = std::this_thread::get_id();
    send_completion(dev, first, 0);
    send_completion(dev, plain, 0);
  });
  // Two concurrent tasks, one on each lane: the one on the pool thread completes; the one on
  // the device thread waits until that completion's actor has run. Only lane 0 (the device
  // thread) ran woken actors: then it ran after that task, which waited in vain.
  std::promise<void> release = hold(dev);
  std::atomic<int> started{0};
  std::atomic<bool> hop_seen_during_task{false};
  std::thread::id pool_lane;
  auto hop = lane_hop.get_future().share();
  for (int e = 0; e < 2; ++e)
    dev.post_concurrent("expert L0 E" + std::to_string(e) + " x1", [&](gpu::backend&) {
      ++started;
      wait_until([&] { return started.load() == 2; });
      if (std::this_thread::get_id() == device_thread) {
        hop_seen_during_task = hop.wait_for(wait_limit) == std::future_status::ready;
      } else {
        pool_lane = std::this_thread::get_id();
        send_completion(dev, from_lane, 0);
      }
    });
  release.set_value();
  std::future<std::thread::id> hops[] = {first_hop.get_future(), second_hop.get_future(), plain_hop.get_future()};
  for (auto& h : hops)
    REQUIRE(h.wait_for(wait_limit) == std::future_status::ready);
  REQUIRE(hop.wait_for(wait_limit) == std::future_status::ready);
  REQUIRE(dev.drain(wait_limit));
  CHECK(started.load() == 2);
  CHECK(hops[0].get() == device_thread);
  CHECK(hops[1].get() == device_thread);
  CHECK(hops[2].get() != device_thread);
  // Run by the free lane, the pool thread, while the device thread's task still ran.
  CHECK(hop_seen_during_task.load());
  CHECK(hop.get() == pool_lane);
  CHECK(dev.inline_resumes() >= 3);
  for (caf::actor* a : {&first, &second, &from_lane, &plain}) {
    caf::anon_send_exit(*a, caf::exit_reason::user_shutdown);
    *a = nullptr;
  }
  system.await_all_actors_done();
}

TEST_CASE("under CAF's test coordinator a device has no completion unit, even with actors inline") {
  // A test that scripts every message (tests/actors/data_path) drives each actor itself.
  device scripted{"device 0", 1, nullptr}, live{"device 1", 1, nullptr};
  scripted.set_actors_inline(true);
  live.set_actors_inline(true);
  caf::actor_system_config testing_cfg, sharing_cfg;
  testing_cfg.set("scheduler.policy", caf::atom("testing"));
  testing_cfg.set("logger.verbosity", caf::atom("quiet"));
  sharing_cfg.set("scheduler.policy", caf::atom("sharing"));
  sharing_cfg.set("logger.verbosity", caf::atom("quiet"));
  caf::actor_system testing{testing_cfg}, sharing{sharing_cfg};
  CHECK(scripted.completion_unit(testing) == nullptr);
  CHECK(live.completion_unit(sharing) != nullptr);
  CHECK(live.completion_unit(testing) == nullptr);  // another system than its first
}

TEST_CASE("a device task that throws comes back as an error and the device runs on") {
  device dev{"expert 3", 1, nullptr};
  std::mutex mutex;
  std::vector<std::string> errors;
  std::atomic<bool> next_ran{false};
  dev.post(
      "expert L2 E5 x7", [](auto&) { throw std::runtime_error("out of device memory"); },
      [&](std::string why) {
        std::lock_guard<std::mutex> guard{mutex};
        errors.push_back(std::move(why));
      });
  dev.post("expert L2 E6 x1", [&](auto&) { next_ran = true; });
  REQUIRE(dev.drain(wait_limit));
  CHECK(next_ran.load());
  CHECK(dev.failed_tasks() == 1);
  std::lock_guard<std::mutex> guard{mutex};
  REQUIRE(errors.size() == 1);
  CHECK(errors[0] == "expert L2 E5 x7 on expert 3: out of device memory");
}

TEST_CASE("concurrent device tasks run side by side on single-threaded lanes, in order with the others") {
  device dev{"device 0", 2, nullptr};
  REQUIRE(dev.lanes() == 2);
  // Each of the two concurrent tasks waits (bounded) until the other has started: they can
  // only both see the other if they run at the same time.
  std::atomic<int> started{0};
  std::atomic<int> saw_other{0};
  std::atomic<int> lane_threads{0};
  std::mutex mutex;
  std::vector<std::string> order;
  auto concurrent_task = [&](std::string name) {
    return [&, name](gpu::backend& lane) {
      lane_threads += lane.name().find("1 thread)") != std::string::npos ? 1 : 0;
      ++started;
      auto until = std::chrono::steady_clock::now() + std::chrono::seconds{5};
      while (started.load() < 2 && std::chrono::steady_clock::now() < until)
        std::this_thread::yield();
      saw_other += started.load() == 2 ? 1 : 0;
      std::lock_guard<std::mutex> guard{mutex};
      order.push_back(name);
    };
  };
  // Held until the concurrent pair is queued behind it, so the device sees the two together.
  std::promise<void> release;
  auto gate = release.get_future().share();
  dev.post("gate", [&, gate](gpu::backend&) {
    gate.wait_for(std::chrono::seconds{5});
    std::lock_guard<std::mutex> guard{mutex};
    order.push_back("gate");
  });
  dev.post_concurrent("expert L0 E1 x1", concurrent_task("e1"));
  dev.post_concurrent("expert L0 E2 x1", concurrent_task("e2"));
  dev.post("attention L1 mb0", [&](gpu::backend& b) {
    std::lock_guard<std::mutex> guard{mutex};
    order.push_back(b.name().find("2 threads)") != std::string::npos ? "after, whole pool" : "after, " + b.name());
  });
  release.set_value();
  REQUIRE(dev.drain(wait_limit));
  CHECK(saw_other.load() == 2);
  CHECK(lane_threads.load() == 2);  // each ran on a lane of one thread
  std::lock_guard<std::mutex> guard{mutex};
  REQUIRE(order.size() == 4);
  CHECK(order.front() == "gate");
  CHECK(order.back() == "after, whole pool");  // the ordinary task after them has every thread
}

TEST_CASE("a lane that finishes a concurrent task takes the next one while the other lane still runs") {
  // Taken lanes() at a time, a layer's experts ran in rounds, each waiting for its slowest.
  device dev{"device 0", 2, nullptr};
  std::atomic<bool> third_started{false};
  std::atomic<bool> long_saw_third{false};
  std::promise<void> release = hold(dev);
  dev.post_concurrent("expert L0 E0 x1",
                      [&](gpu::backend&) { long_saw_third = wait_until([&] { return third_started.load(); }); });
  dev.post_concurrent("expert L0 E1 x1", [](gpu::backend&) {});
  dev.post_concurrent("expert L0 E2 x1", [&](gpu::backend&) { third_started = true; });
  release.set_value();
  REQUIRE(dev.drain(wait_limit));
  CHECK(long_saw_third.load());
  CHECK(dev.failed_tasks() == 0);
}

TEST_CASE("a pulled concurrent task's captures are freed when it ends and not when the other lane's task ends") {
  // An expert batch's closure holds its rows (and over a cluster their transport pool credit):
  // kept until the whole pulled run ended, a long run could exhaust the pool.
  device dev{"device 0", 2, nullptr};
  auto rows = std::make_shared<int>(7);
  std::weak_ptr<int> watch = rows;
  std::atomic<bool> long_saw_freed{false};
  std::promise<void> release = hold(dev);
  dev.post_concurrent("expert L0 E0 x1",
                      [&](gpu::backend&) { long_saw_freed = wait_until([&] { return watch.expired(); }); });
  dev.post_concurrent("expert L0 E1 x1", [held = std::move(rows)](gpu::backend&) { (void)*held; });
  release.set_value();
  REQUIRE(dev.drain(wait_limit));
  CHECK(long_saw_freed.load());
  CHECK(dev.failed_tasks() == 0);
}

TEST_CASE("a concurrent task whose hook throws fails alone; its partner runs") {
  device dev{"device 0", 2, nullptr};
  std::atomic<int> ran{0};
  std::atomic<int> errors{0};
  std::promise<void> release = hold(dev);
  dev.set_task_hook([](const std::string& label) {
    if (label == "expert L0 E1 x1")
      throw std::runtime_error("injected");
  });
  dev.post_concurrent("expert L0 E1 x1", [&](gpu::backend&) { ++ran; }, [&](std::string) { ++errors; });
  dev.post_concurrent("expert L0 E2 x1", [&](gpu::backend&) { ++ran; }, [&](std::string) { ++errors; });
  release.set_value();
  REQUIRE(dev.drain(wait_limit));
  CHECK(ran.load() == 1);
  CHECK(errors.load() == 1);
  CHECK(dev.failed_tasks() == 1);
}

TEST_CASE("a shard that dies while its device task is queued leaves that task valid state") {
  shard_fixture f;
  // Hold the device so the shard's first attention task waits behind this one.
  std::mutex mutex;
  std::vector<std::string> ran;
  f.dev.set_task_hook([&](const std::string& label) {
    std::lock_guard<std::mutex> guard{mutex};
    ran.push_back(label);
  });
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  f.dev.post("blocker", [released](auto&) { released.wait_for(std::chrono::seconds{10}); });
  REQUIRE(wait_until([&] {
    std::lock_guard<std::mutex> guard{mutex};
    return !ran.empty();
  }));  // the blocker runs
  f.admit(1);
  REQUIRE(wait_until([&] { return f.dev.queued() >= 1; }));  // the attention task is queued
  caf::anon_send_exit(f.shard, caf::exit_reason::kill);
  CHECK(f.await_down() != "");
  release.set_value();  // the queued task runs now, after its shard's exit
  REQUIRE(f.dev.drain(wait_limit));
  std::lock_guard<std::mutex> guard{mutex};
  // Both tasks it had queued (attention, then the shared expert that reads its output) ran.
  CHECK(std::find(ran.begin(), ran.end(), "attention L0 mb0") != ran.end());
  CHECK(std::find(ran.begin(), ran.end(), "shared/dense L0 mb0") != ran.end());
  CHECK(f.dev.failed_tasks() == 0);
}

TEST_CASE("an attention task that throws makes its shard exit naming the task and the cause") {
  shard_fixture f;
  f.dev.set_task_hook([](const std::string& label) {
    if (label.rfind("attention", 0) == 0)
      throw std::runtime_error("injected kernel failure");
  });
  f.admit(2);
  std::string reason = f.await_down();
  INFO(reason);
  CHECK(reason.find("attention L0 mb0 on attention 0: injected kernel failure") != std::string::npos);
  CHECK(f.dev.failed_tasks() == 1);
}
