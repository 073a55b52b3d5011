// DESIGN.md §2 as an executable script: one request walks the whole actor data path under
// CAF's test coordinator (scheduler.policy=testing), and the script lets exactly one message
// be handled at a time, in the order below, checking each one's receiver, sender and content:
//
//   setup    policy ─plan_update─▶ shard, ─scheduler_update─▶ queues,
//            engine ─policy─▶ shard, engine ─shard list─▶ ingress
//   admit    client ─admit_request─▶ ingress ─admit_request─▶ shard ─step─▶ shard
//   per step shard ─shape_report─▶ policy, then per layer
//            shard's device ─attn_done─▶ shard            (attention + router ran)
//            shard ─routed_tokens (A2E)─▶ mu_queue d      (for each device d hosting a chosen expert)
//            shard's device ─side_done─▶ shard            (shared expert / dense MLP ran)
//            mu_queue d ─expert_batch─▶ expert e          (one drained μ-queue, to its expert's own
//                                                          actor; two at once: two in flight)
//            expert e's device ─batch_done─▶ expert e
//            expert e ─expert_outputs (E2A)─▶ shard
//            expert e ─expert_done─▶ mu_queue d           (room on the device: the next batch, to
//                                                          an expert of the layer that has none)
//   per step shard's device ─final_done─▶ shard ─token_event─▶ client's sink, shard ─step─▶ shard
//            (the last token instead: shard ─request_ended─▶ ingress, which releases the
//            request and only then hands the last token_event to the sink)
//   end      nothing else is pending anywhere
//
// Every payload is compared bit for bit with an independent re-computation by the model's layer
// functions (`shadow` below), and the generated tokens with the reference forward.
//
// The devices are real threads: their completions arrive with caf::anon_send from those
// threads, so the script waits (at most 5 s) for such a message to reach its receiver before
// letting it run. The script never lets an actor send to a mailbox that a device completion
// may also be racing to, so every mailbox's order is fixed and the run is deterministic.
#include <catch2/catch.hpp>

#include "actors/attention_shard.hpp"
#include "actors/device.hpp"
#include "actors/expert.hpp"
#include "actors/ingress.hpp"
#include "actors/mu_queue.hpp"
#include "actors/policy_actor.hpp"
#include "actors/protocol.hpp"
#include "actors/runtime.hpp"
#include "model/config.hpp"
#include "model/forward.hpp"
#include "model/layers.hpp"
#include "model/sampler.hpp"
#include "model/weights.hpp"

#include <caf/all.hpp>
#include <caf/scheduler/test_coordinator.hpp>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

using namespace moert;
using namespace moert::actors;

namespace {

// Two layers: layer 0 sparse (4 experts, top-2) with a qwen2_moe shared expert, layer 1 dense.
const char* tiny_model = R"({"model_type": "qwen2_moe", "vocab_size": 64, "hidden_size": 16,
  "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "num_experts": 4,
  "num_experts_per_tok": 2, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 12,
  "intermediate_size": 24, "mlp_only_layers": [1], "norm_topk_prob": false})";
constexpr std::uint64_t weight_seed = 11;
constexpr std::size_t num_expert_devices = 2;
constexpr std::uint64_t request_id = 42;
const std::vector<std::int32_t> prompt = {3, 17, 40};
constexpr std::size_t max_new_tokens = 2;
const model::sampling_params sampling{0.8f, 40, 0.95f, 77};  // sampled: keyed by the request id

// The completions the shard's and the expert's device tasks post (atoms private to their .cpp).
const caf::atom_value attn_done = caf::atom("attn_done");
const caf::atom_value side_done = caf::atom("side_done");
const caf::atom_value final_done = caf::atom("final_done");
const caf::atom_value batch_done = caf::atom("batch_done");

constexpr auto wait_limit = std::chrono::seconds{5};

bool same_bits(const float* a, const float* b, std::size_t n) {
  return std::memcmp(a, b, n * sizeof(float)) == 0;
}

// -- the test coordinator, safe for device threads -----------------------------------------

// CAF's test coordinator keeps its job list unsynchronised: fine for actors, which the script
// runs on its own thread, but a device thread's anon_send enqueues a blocked receiver from
// that thread. Every touch of the job list holds `mutex`: the devices' through enqueue(), the
// script's explicitly (recursive: the script's own sends enqueue too).
class locked_coordinator : public caf::scheduler::test_coordinator {
public:
  using test_coordinator::test_coordinator;
  std::recursive_mutex mutex;

protected:
  void enqueue(caf::resumable* job) override {
    std::lock_guard<std::recursive_mutex> guard{mutex};
    test_coordinator::enqueue(job);
  }
};

// -- what each message must carry ----------------------------------------------------------

struct layer_expect {
  std::size_t top_k = 0;
  std::vector<float> normed;                 // rows × hidden: the A2E rows
  std::vector<model::routed_slot> routes;    // rows × top_k, by expert index
  std::vector<std::vector<float>> weighted;  // per join slot: weight · expert(normed row)
};

struct step_expect {
  std::size_t rows = 0;
  std::vector<layer_expect> layers;
  std::vector<float> logits;  // of the sequence's last row
  std::int32_t token = -1;
};

// The shard's arithmetic redone by direct calls of the layer functions, one token row at a
// time for the experts (batch invariance makes that the same bits as the re-batched run).
class shadow {
public:
  shadow(const model::model_config& config, const model::model_weights& weights)
      : config_(config), weights_(weights), cache_(config), rope_(config) {}

  step_expect step(const std::vector<std::int32_t>& feed, std::size_t sample_position) {
    const std::size_t hidden = std::size_t(config_.hidden_size);
    const std::size_t rows = feed.size();
    step_expect out;
    out.rows = rows;
    cache_.grow(rows);
    std::vector<model::token_slot> tokens;
    for (std::size_t j = 0; j < rows; ++j)
      tokens.push_back({&cache_, cache_.length() + j});
    rope_.ensure(cache_.length() + rows - 1);
    std::vector<float> x(rows * hidden);
    gpu::backend& host = gpu::host_backend();
    model::embed_step(config_, weights_, feed, x.data(), host);

    std::vector<float> side;
    for (std::size_t layer = 0; layer < std::size_t(config_.num_layers); ++layer) {
      if (layer > 0)
        combine(out.layers.back(), side, rows, x);
      layer_expect& le = out.layers.emplace_back();
      le.top_k = config_.sparse_layers[layer] ? std::size_t(config_.num_experts_per_tok) : 0;
      model::attention_step(config_, weights_, rope_, layer, tokens, x.data(), host);
      le.normed.resize(rows * hidden);
      le.routes.resize(rows * le.top_k);
      model::route_step(config_, weights_, layer, x.data(), rows, le.normed.data(), le.routes.data(), host);
      side.clear();
      if (model::has_side_ffn(config_, layer)) {
        side.resize(rows * hidden);
        model::side_ffn_step(config_, weights_, layer, le.normed.data(), rows, side.data(), host);
      }
      std::vector<float> y(hidden);
      for (std::size_t slot = 0; slot < le.routes.size(); ++slot) {
        const model::routed_slot& route = le.routes[slot];
        model::expert_step(weights_, layer, std::size_t(route.expert), le.normed.data() + (slot / le.top_k) * hidden,
                           1, y.data(), host);
        std::vector<float>& w = le.weighted.emplace_back(hidden);
        model::weight_row(y.data(), route.weight, hidden, w.data());
      }
    }
    combine(out.layers.back(), side, rows, x);
    out.logits.resize(std::size_t(config_.vocab_size));
    model::logits_step(config_, weights_, x.data() + (rows - 1) * hidden, 1, out.logits.data(), host);
    out.token = model::sample(out.logits, sampling, request_id, sample_position);
    cache_.advance(rows);
    return out;
  }

private:
  void combine(const layer_expect& le, const std::vector<float>& side, std::size_t rows, std::vector<float>& x) {
    std::vector<const float*> ptrs;
    for (const auto& w : le.weighted)
      ptrs.push_back(w.data());
    model::combine_step(std::size_t(config_.hidden_size), le.top_k, ptrs.data(), side.empty() ? nullptr : side.data(),
                        rows, x.data(), gpu::host_backend());
  }

  const model::model_config& config_;
  const model::model_weights& weights_;
  model::kv_cache cache_;
  model::rope_table rope_;
};

// -- the fixture: the actors of one engine, spawned and wired as engine.cpp does -------------

class data_path_fixture {
public:
  data_path_fixture() {
    auto parsed = model::parse_config(tiny_model, "data_path test model");
    REQUIRE(parsed.ok());
    config = *parsed;
    ctx.config = config;
    ctx.weights = std::make_shared<const model::model_weights>(model::synthetic_weights(config, weight_seed));
    ctx.num_expert_devices = num_expert_devices;
    ctx.stats = &stats;
    ctx.trace = nullptr;

    cfg.set("scheduler.policy", caf::atom("testing"));
    cfg.set("logger.verbosity", caf::atom("quiet"));
    cfg.set("logger.file-verbosity", caf::atom("quiet"));
    cfg.set("logger.console-verbosity", caf::atom("quiet"));
    // The test coordinator with a locked job list replaces the plain one ("testing").
    cfg.module_factories.push_back(
        [](caf::actor_system& sys) -> caf::actor_system::module* { return new locked_coordinator(sys); });
    system = std::make_unique<caf::actor_system>(cfg);
    sched = &dynamic_cast<locked_coordinator&>(system->scheduler());

    plan = {1, 0, 1, policy::segment_order::asas};
    scheduler.policy = policy::queue_policy::defrag;
    scheduler.params.max_wait = std::chrono::nanoseconds{0};  // no wall-clock guard: counts decide

    experts.resize(std::size_t(config.num_experts));
    for (std::size_t d = 0; d < num_expert_devices; ++d) {
      devices.push_back(std::make_unique<device>("expert " + std::to_string(d), 1, nullptr));
      ctx.expert_devices.push_back(devices.back().get());
      std::map<std::uint32_t, caf::actor> hosted;
      for (std::uint32_t e : ctx.hosted_by(d))
        hosted[e] = experts[e] = system->spawn<expert>(cctx(), e);
      queues.push_back(system->spawn<mu_queue>(cctx(), d, scheduler, devices.back()->name(), hosted));
    }
    ingress_actor = system->spawn<ingress>(std::size_t{1} << 16);
    devices.push_back(std::make_unique<device>("attention 0", 1, nullptr));
    shard = system->spawn<attention_shard>(cctx(), std::uint32_t{0}, devices.back().get(), queues, ingress_actor, plan);
    // Offline policy (no FinDEP problem): it pushes the configured plan and only listens.
    policy_actor_ = system->spawn<policy_actor>(cctx(), std::vector<caf::actor>{shard}, queues, plan, scheduler,
                                                std::optional<online_problem>{});
    all.insert(all.end(), experts.begin(), experts.end());
    all.insert(all.end(), queues.begin(), queues.end());
    all.insert(all.end(), {ingress_actor, shard, policy_actor_});
  }

  ~data_path_fixture() {
    // Also after a failed check, with device tasks in flight: stop every actor while the devices
    // still exist (a handler run before an actor's exit may still post work), then the devices
    // (completions of tasks still running go to terminated actors and are dropped), then the
    // system. A device thread may be about to enqueue an actor (waiting for the lock), so the
    // scheduler runs, with the lock released in between, until no actor is left running.
    for (const auto& a : all)
      caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
    auto deadline = std::chrono::steady_clock::now() + wait_limit;
    while (system->registry().running() > 0) {
      {
        std::lock_guard<std::recursive_mutex> guard{sched->mutex};
        while (sched->try_run_once()) {
        }
      }
      if (std::chrono::steady_clock::now() > deadline) {
        system->await_actors_before_shutdown(false);  // never hang: leave the stragglers
        break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds{100});
    }
    devices.clear();
    all.clear();
    queues.clear();
    experts.clear();
    ingress_actor = nullptr;
    shard = nullptr;
    policy_actor_ = nullptr;
    system.reset();
  }

  const runtime_context* cctx() const { return &ctx; }

  // -- stepping ------------------------------------------------------------------------------

  // Runs an actor's first activation (make_behavior); its mailbox must still be empty.
  void initialize(const caf::actor& whom) {
    std::lock_guard<std::recursive_mutex> guard{sched->mutex};
    auto* ptr = caf::actor_cast<caf::abstract_actor*>(whom);
    REQUIRE(sched->prioritize(whom));
    REQUIRE(ptr->peek_at_next_mailbox_element() == nullptr);
    sched->run_once();
  }

  bool scheduled(const caf::actor& whom) {
    auto* job = dynamic_cast<caf::resumable*>(caf::actor_cast<caf::abstract_actor*>(whom));
    return std::find(sched->jobs.begin(), sched->jobs.end(), job) != sched->jobs.end();
  }

  // The hop `hop`: waits (at most 5 s) until `to` has a message, checks that it comes from
  // `from` (null: an anonymous device completion or client send) and passes `check`, then lets
  // `to` handle exactly that message.
  void expect(const std::string& hop, const caf::actor& to, const caf::actor* from,
              const std::function<void(const caf::type_erased_tuple&)>& check) {
    INFO("hop " << ++hops << ": " << hop);
    auto* dest = caf::actor_cast<caf::abstract_actor*>(to);
    auto deadline = std::chrono::steady_clock::now() + wait_limit;
    std::unique_lock<std::recursive_mutex> lock{sched->mutex};
    caf::mailbox_element* next = nullptr;
    for (;;) {
      if (scheduled(to) && (next = dest->peek_at_next_mailbox_element()) != nullptr)
        break;
      if (std::chrono::steady_clock::now() > deadline)
        FAIL("no message arrived within 5 s");
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::microseconds{100});
      lock.lock();
    }
    INFO("message: " << next->content().stringify());
    if (from == nullptr)
      REQUIRE(next->sender == nullptr);
    else
      REQUIRE(next->sender == caf::actor_cast<caf::strong_actor_ptr>(*from));
    check(next->content());
    REQUIRE(sched->prioritize(to));
    sched->run_once();
  }

  template <class T>
  void expect_value(const std::string& hop, const caf::actor& to, const caf::actor* from,
                    const std::function<void(const T&)>& check) {
    expect(hop, to, from, [&](const caf::type_erased_tuple& content) {
      REQUIRE(content.match_elements<T>());
      check(content.get_as<T>(0));
    });
  }

  // A message starting with `atom`; `check` sees the rest.
  void expect_atom(const std::string& hop, const caf::actor& to, const caf::actor* from, caf::atom_value atom,
                   const std::function<void(const caf::type_erased_tuple&)>& check = {}) {
    expect(hop, to, from, [&](const caf::type_erased_tuple& content) {
      REQUIRE(content.size() >= 1);
      REQUIRE(content.match_element<caf::atom_value>(0));
      REQUIRE(content.get_as<caf::atom_value>(0) == atom);
      if (check)
        check(content);
      else
        REQUIRE(content.size() == 1);
    });
  }

  // The actors that still have something to do (a message, or a first activation).
  std::vector<caf::actor> pending() {
    std::lock_guard<std::recursive_mutex> guard{sched->mutex};
    std::vector<caf::actor> out;
    for (const auto& a : all)
      if (scheduled(a))
        out.push_back(a);
    return out;
  }

  // -- the script of one step ------------------------------------------------------------------

  void run_step(std::uint64_t step, const step_expect& want) {
    expect_atom("shard -> shard: step " + std::to_string(step), shard, &shard, step_atom::value);
    expect_value<shape_report>("shard -> policy: shape_report (step " + std::to_string(step) + ")", policy_actor_,
                               &shard, [&](const shape_report& r) {
                                 REQUIRE(r.shard == 0u);
                                 REQUIRE(r.sequences == 1u);
                                 // The sequence's length after this step.
                                 REQUIRE(r.context_tokens == prompt.size() + step);
                               });
    for (std::size_t layer = 0; layer < want.layers.size(); ++layer) {
      const layer_expect& le = want.layers[layer];
      std::string where = " (step " + std::to_string(step) + ", layer " + std::to_string(layer) + ")";
      // A completion of the shard's device: (atom, step, micro-batch).
      auto completion = [step](const caf::type_erased_tuple& c) {
        REQUIRE((c.match_elements<caf::atom_value, std::uint64_t, std::uint32_t>()));
        REQUIRE(c.get_as<std::uint64_t>(1) == step);
        REQUIRE(c.get_as<std::uint32_t>(2) == 0u);  // micro-batch 0 (r1 = 1)
      };
      expect_atom("shard's device -> shard: attention done" + where, shard, nullptr, attn_done, completion);
      if (le.top_k > 0) {
        // ASAS: the A2E messages left with the attention's completion, before the
        // attention-side FFN, one to each device hosting a chosen expert and none elsewhere.
        std::lock_guard<std::recursive_mutex> guard{sched->mutex};
        for (std::size_t d = 0; d < num_expert_devices; ++d) {
          INFO("mu_queue " << d << where);
          REQUIRE(scheduled(queues[d]) == !routes_on(le, d).empty());
        }
      }
      // The A2E messages are in the queues' mailboxes now; the shared expert / dense MLP runs on
      // the shard's device. Its completion is handled first, so that no E2A can race it.
      if (model::has_side_ffn(config, layer))
        expect_atom("shard's device -> shard: attention-side FFN done" + where, shard, nullptr, side_done,
                    completion);
      if (le.top_k == 0) {
        REQUIRE(le.routes.empty());
        continue;
      }
      for (std::size_t d = 0; d < num_expert_devices; ++d)
        run_expert_device(step, layer, d, le, where);
    }
    expect_atom("shard's device -> shard: lm_head + sampler done (step " + std::to_string(step) + ")", shard,
                nullptr, final_done, [&](const caf::type_erased_tuple& c) {
                  REQUIRE((c.match_elements<caf::atom_value, std::uint64_t, std::uint32_t, std::vector<std::int32_t>,
                                            std::vector<std::vector<float>>, std::vector<token_logprobs>>()));
                  REQUIRE(c.get_as<std::uint64_t>(1) == step);
                  REQUIRE(c.get_as<std::uint32_t>(2) == 0u);
                  REQUIRE(c.get_as<std::vector<std::int32_t>>(3) == std::vector<std::int32_t>{want.token});
                  const auto& logits = c.get_as<std::vector<std::vector<float>>>(4);
                  REQUIRE(logits.size() == 1);
                  REQUIRE(logits[0].size() == want.logits.size());
                  REQUIRE(same_bits(logits[0].data(), want.logits.data(), want.logits.size()));
                  // Log-probs are computed only for sequences that ask; this one did not.
                  const auto& logprobs = c.get_as<std::vector<token_logprobs>>(5);
                  REQUIRE(logprobs.size() == 1);
                  CHECK(logprobs[0].top_tokens.empty());
                });
  }

  // The routes expert device d hosts, row-major then k: round-robin placement, expert e on
  // device e mod eg (its queue's slot there: e div eg).
  std::vector<route_entry> routes_on(const layer_expect& le, std::size_t d) const {
    std::vector<route_entry> routes;
    for (std::size_t slot = 0; slot < le.routes.size(); ++slot) {
      const model::routed_slot& r = le.routes[slot];
      if (std::size_t(r.expert) % num_expert_devices == d)
        routes.push_back({std::uint32_t(slot / le.top_k), std::uint32_t(slot),
                          std::uint32_t(r.expert), r.weight});
    }
    return routes;
  }

  // A2E to expert device d, then its μ-queues drained one batch each, two in flight, each
  // to its expert's actor and its E2A back to the shard. Devices without a chosen expert must
  // get nothing.
  void run_expert_device(std::uint64_t step, std::size_t layer, std::size_t d, const layer_expect& le,
                         const std::string& where) {
    const std::size_t hidden = std::size_t(config.hidden_size);
    const batch_key key{0, step, 0, std::uint32_t(layer)};
    auto same_key = [](const batch_key& a, const batch_key& b) {
      return a.shard == b.shard && a.step == b.step && a.micro_batch == b.micro_batch && a.layer == b.layer;
    };
    std::vector<route_entry> routes = routes_on(le, d);
    const caf::actor& queue = queues[d];
    std::string dev = " ";  // (not " " + to_string: GCC 12 warns falsely, -Wrestrict)
    dev += std::to_string(d);
    if (routes.empty()) {
      std::lock_guard<std::recursive_mutex> guard{sched->mutex};
      INFO("mu_queue" << dev << where);
      REQUIRE_FALSE(scheduled(queue));  // no A2E to a device that hosts no chosen expert
      return;
    }

    // Only the lease's address is kept: the queue's handler moves the rows on.
    const row_block* lease = nullptr;
    expect_value<routed_tokens>("shard -> mu_queue" + dev + ": A2E" + where, queue, &shard,
                                [&](const routed_tokens& m) {
                                  REQUIRE(same_key(m.key, key));
                                  REQUIRE(m.chunk == 0u);
                                  REQUIRE(m.reply_to == shard);
                                  REQUIRE(m.rows != nullptr);
                                  REQUIRE(m.rows->row_floats == hidden);
                                  REQUIRE(m.rows->data.size() == le.normed.size());
                                  REQUIRE(same_bits(m.rows->data.data(), le.normed.data(), le.normed.size()));
                                  REQUIRE(m.routes.size() == routes.size());
                                  for (std::size_t i = 0; i < routes.size(); ++i) {
                                    INFO("route " << i);
                                    CHECK(m.routes[i].row == routes[i].row);
                                    CHECK(m.routes[i].slot == routes[i].slot);
                                    CHECK(m.routes[i].expert == routes[i].expert);
                                    CHECK(same_bits(&m.routes[i].weight, &routes[i].weight, 1));
                                  }
                                  lease = m.rows.get();
                                });

    // Which μ-queue each batch drains: the same pure scheduler function, on the same counts,
    // in order (every pick is made before any batch of the layer is done: the choice does not
    // depend on when the dones come).
    policy::queue_matrix matrix{std::size_t(config.num_layers), ctx.experts_on(d)};
    auto slot_of = [](const route_entry& r) { return std::size_t(r.expert) / num_expert_devices; };
    for (const route_entry& r : routes)
      matrix.set(layer, slot_of(r), matrix.tokens(layer, slot_of(r)) + 1);
    std::vector<std::size_t> order;
    while (auto choice = policy::pick_queue(matrix, scheduler.policy, scheduler.params, std::chrono::nanoseconds{0})) {
      REQUIRE(choice->layer == layer);
      matrix.set(choice->layer, choice->expert, 0);
      order.push_back(choice->expert);
    }
    std::size_t batches = order.size();
    auto expert_of = [&](std::size_t i) { return order[i] * num_expert_devices + d; };
    auto items_of = [&](std::size_t i) {
      std::vector<route_entry> items;
      for (const route_entry& r : routes)
        if (slot_of(r) == order[i])
          items.push_back(r);
      return items;
    };
    auto name_of = [&](std::size_t i) {
      return " (batch " + std::to_string(i) + ": expert " + std::to_string(expert_of(i)) + ")";
    };
    auto expect_batch = [&](std::size_t i) {
      std::vector<route_entry> items = items_of(i);
      const caf::actor& worker = experts[expert_of(i)];
      expect_value<expert_batch>("mu_queue" + dev + " -> expert: expert_batch" + where + name_of(i), worker, &queue,
                                 [&](const expert_batch& b) {
                                   REQUIRE(b.layer == layer);
                                   REQUIRE(b.expert == expert_of(i));
                                   REQUIRE(b.device == d);
                                   REQUIRE(b.items.size() == items.size());
                                   for (std::size_t k = 0; k < items.size(); ++k) {
                                     INFO("item " << k);
                                     CHECK(b.items[k].rows.get() == lease);  // the same lease: no copy
                                     CHECK(b.items[k].row == items[k].row);
                                     CHECK(b.items[k].slot == items[k].slot);
                                     CHECK(same_bits(&b.items[k].weight, &items[k].weight, 1));
                                     CHECK(same_key(b.items[k].key, key));
                                     CHECK(b.items[k].reply_to == shard);
                                   }
                                 });
    };
    // The A2E handler handed the first two at once; each done lets the next one go.
    for (std::size_t i = 0; i < std::min<std::size_t>(2, batches); ++i)
      expect_batch(i);
    for (std::size_t i = 0; i < batches; ++i) {
      std::vector<route_entry> items = items_of(i);
      const caf::actor& worker = experts[expert_of(i)];
      std::string batch = name_of(i);
      expect_atom("expert's device -> expert: batch done" + where + batch, worker, nullptr, batch_done,
                  [](const caf::type_erased_tuple& c) { REQUIRE(c.size() == 2); });
      expect_value<expert_outputs>("expert -> shard: E2A" + where + batch, shard, &worker,
                                   [&](const expert_outputs& out) {
                                     REQUIRE(same_key(out.key, key));
                                     REQUIRE(out.rows != nullptr);
                                     REQUIRE(out.rows->row_floats == hidden);
                                     REQUIRE(out.rows_idx.size() == items.size());
                                     REQUIRE(out.slots.size() == items.size());
                                     for (std::size_t k = 0; k < items.size(); ++k) {
                                       INFO("entry " << k);
                                       REQUIRE(out.rows_idx[k] == k);
                                       REQUIRE(out.slots[k] == items[k].slot);
                                       CHECK(same_bits(out.rows->row(k), le.weighted[items[k].slot].data(), hidden));
                                     }
                                   });
      expect_atom("expert -> mu_queue" + dev + ": expert_done" + where + batch, queue, &worker,
                  expert_done_atom::value, [&](const caf::type_erased_tuple& c) {
                    REQUIRE((c.match_elements<caf::atom_value, std::uint32_t>()));
                    REQUIRE(c.get_as<std::uint32_t>(1) == expert_of(i));
                  });
      if (i + 2 < batches)
        expect_batch(i + 2);
    }
    REQUIRE(batches >= 1);
  }

  model::model_config config;
  runtime_stats stats;
  runtime_context ctx;
  execution_plan plan;
  scheduler_update scheduler;
  std::vector<std::unique_ptr<device>> devices;  // experts 0..eg-1, then the shard's
  caf::actor_system_config cfg;
  std::unique_ptr<caf::actor_system> system;
  locked_coordinator* sched = nullptr;
  std::vector<caf::actor> queues, experts;
  caf::actor ingress_actor, shard, policy_actor_;
  std::vector<caf::actor> all;
  std::size_t hops = 0;
};

}  // namespace

TEST_CASE_METHOD(data_path_fixture, "one request through every hop of the data path, message by message",
                 "[actors]") {
  auto started = std::chrono::steady_clock::now();

  // What every hop must carry, and what the reference forward generates for the request.
  shadow expected{config, *ctx.weights};
  std::vector<step_expect> steps;
  steps.push_back(expected.step(prompt, prompt.size()));
  steps.push_back(expected.step({steps[0].token}, prompt.size() + 1));
  model::reference_model reference{config, model::synthetic_weights(config, weight_seed), 1};
  std::vector<model::generation_request> ref_request{{request_id, prompt, max_new_tokens, sampling}};
  auto generated = model::generate(reference, ref_request, model::decode_mode::kv_cache);
  REQUIRE(generated.ok());
  REQUIRE((*generated)[0] == std::vector<std::int32_t>{steps[0].token, steps[1].token});
  // The script covers both expert devices and a device draining more than one μ-queue.
  {
    const layer_expect& first = steps[0].layers[0];
    std::vector<std::size_t> per_device(num_expert_devices), experts_used(std::size_t(config.num_experts));
    for (const auto& r : first.routes) {
      ++per_device[std::size_t(r.expert) % num_expert_devices];
      ++experts_used[std::size_t(r.expert)];
    }
    REQUIRE(per_device[0] > 0);
    REQUIRE(per_device[1] > 0);
    REQUIRE(std::count_if(experts_used.begin(), experts_used.end(), [](std::size_t n) { return n > 0; }) >= 3);
  }

  // -- setup: first activations, in spawn order, then what they sent ---------------------------
  for (const auto& a : all)
    initialize(a);
  expect_value<plan_update>("policy -> shard: plan_update", shard, &policy_actor_, [&](const plan_update& u) {
    REQUIRE(u.plan.r1 == plan.r1);
    REQUIRE(u.plan.m_a == plan.m_a);
    REQUIRE(u.plan.r2 == plan.r2);
    REQUIRE(u.plan.order == plan.order);
  });
  for (std::size_t d = 0; d < num_expert_devices; ++d)
    expect_value<scheduler_update>("policy -> mu_queue " + std::to_string(d) + ": scheduler_update", queues[d],
                                   &policy_actor_, [&](const scheduler_update& u) {
                                     REQUIRE(u.policy == scheduler.policy);
                                     REQUIRE(u.params.max_wait == scheduler.params.max_wait);
                                   });
  caf::anon_send(shard, policy_atom::value, policy_actor_);
  expect_atom("engine -> shard: where to report (the policy)", shard, nullptr, policy_atom::value,
              [&](const caf::type_erased_tuple& c) {
                REQUIRE((c.match_elements<caf::atom_value, caf::actor>()));
                REQUIRE(c.get_as<caf::actor>(1) == policy_actor_);
              });
  caf::anon_send(ingress_actor, std::vector<caf::actor>{shard});
  expect_value<std::vector<caf::actor>>("engine -> ingress: the shard list", ingress_actor, nullptr,
                                        [&](const std::vector<caf::actor>& s) {
                                          REQUIRE(s == std::vector<caf::actor>{shard});
                                        });
  REQUIRE(pending().empty());

  // -- admission -------------------------------------------------------------------------------
  std::vector<token_event> events;
  admit_request request;
  request.request_id = request_id;
  request.prompt = prompt;
  request.max_new_tokens = max_new_tokens;
  request.sampling = sampling;
  request.return_logits = true;
  request.sink = std::make_shared<token_sink>([&events](token_event e) { events.push_back(std::move(e)); });
  caf::anon_send(ingress_actor, request);
  auto same_request = [&](const admit_request& r) {
    REQUIRE(r.request_id == request_id);
    REQUIRE(r.prompt == prompt);
    REQUIRE(r.max_new_tokens == max_new_tokens);
    REQUIRE(r.return_logits);
    REQUIRE(r.sink == request.sink);
  };
  expect_value<admit_request>("client -> ingress: admit_request", ingress_actor, nullptr, same_request);
  expect_value<admit_request>("ingress -> shard: admit_request (pinned)", shard, &ingress_actor, same_request);

  // -- the steps: prefill of the prompt, then one decode step ------------------------------------
  for (std::size_t s = 0; s < max_new_tokens; ++s) {
    INFO("step " << s + 1);
    REQUIRE(events.size() == s);
    run_step(s + 1, steps[s]);
    bool last = s + 1 == max_new_tokens;
    if (last) {
      // The last token goes through the ingress: it frees the request's KV reservation and id
      // first, and only then tells the client (who may reuse the id at once).
      REQUIRE(events.size() == s);
      expect_value<request_ended>("shard -> ingress: request_ended", ingress_actor, &shard,
                                  [&](const request_ended& m) {
                                    REQUIRE(m.request_id == request_id);
                                    REQUIRE(m.kv_tokens == prompt.size() + max_new_tokens);
                                    REQUIRE(m.sink == request.sink);
                                    REQUIRE(m.last.token == steps[s].token);
                                    REQUIRE(m.last.finish == finish_reason::length);
                                    REQUIRE(m.last.admitted != std::chrono::steady_clock::time_point{});
                                  });
    }
    // The final_done handler (or, for the last, the ingress) called the sink with the token.
    REQUIRE(events.size() == s + 1);
    const token_event& e = events.back();
    CHECK(e.request_id == request_id);
    CHECK(e.token == steps[s].token);
    CHECK(e.index == s);
    CHECK(e.last == last);
    CHECK(e.finish == (last ? finish_reason::length : finish_reason::none));
    CHECK(e.error_code == request_error::none);
    CHECK(e.error.empty());
    REQUIRE(e.logits.size() == steps[s].logits.size());
    CHECK(same_bits(e.logits.data(), steps[s].logits.data(), e.logits.size()));
    if (s + 1 < max_new_tokens)
      REQUIRE(pending() == std::vector<caf::actor>{shard});  // only the next step is pending
  }

  // -- the end: the shard goes idle ------------------------------------------------------------
  expect_atom("shard -> shard: step (nothing left to run)", shard, &shard, step_atom::value);
  REQUIRE(pending().empty());

  std::vector<std::int32_t> tokens;
  for (const auto& e : events)
    tokens.push_back(e.token);
  CHECK(tokens == (*generated)[0]);  // the reference forward, same request id and sampling
  CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds{10});
}
