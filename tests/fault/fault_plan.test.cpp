// The fault file parser (every key, errors that name the key) and the injector's decisions:
// a pure function of (seed, message identity), so a seed reproduces them.
#include <catch2/catch.hpp>

#include "engine/engine.hpp"
#include "engine/fault_plan.hpp"
#include "test_support.hpp"

#include <map>

using namespace moert;
using transport::fault_action;
using transport::fault_injector;
using transport::message_identity;

namespace {

// The minimal file of the fault issue, as written.
const char* issue_file = R"({"seed": 7, "drop": 0.02, "duplicate": 0.02, "reorder": 0.02,
 "delay": {"probability": 0.05, "max_ms": 5},
 "kill": [{"actor": "expert", "device": 0, "after_messages": 50},
          {"actor": "attention", "device": 0, "after_messages": 200}],
 "slow": [{"device": "expert:1", "factor": 3}]})";

std::string error_of(const std::string& text) {
  auto plan = parse_fault_plan(text, "f.json");
  REQUIRE_FALSE(plan.ok());
  return plan.err().message;
}

message_identity identity(std::uint64_t i) {
  message_identity id;
  id.kind = i % 2 ? transport::message_kind::e2a : transport::message_kind::a2e;
  id.shard = std::uint32_t(i % 3);
  id.step = i / 7;
  id.micro_batch = std::uint32_t(i % 5);
  id.layer = std::uint32_t(i % 11);
  id.chunk = std::uint32_t(i % 2);
  id.expert_device = std::uint32_t(i % 4);
  id.attempt = std::uint32_t(i % 3);
  id.detail = i;
  return id;
}

}  // namespace

TEST_CASE("the issue's minimal fault file parses as written") {
  auto plan = parse_fault_plan(issue_file, "issue.json");
  REQUIRE(plan.ok());
  CHECK(plan->seed == 7);
  CHECK(plan->drop == 0.02);
  CHECK(plan->duplicate == 0.02);
  CHECK(plan->reorder == 0.02);
  CHECK(plan->delay_probability == 0.05);
  CHECK(plan->delay_max_ms == 5);
  REQUIRE(plan->kill.size() == 2);
  CHECK(plan->kill[0].actor == transport::fault_actor::expert);
  CHECK(plan->kill[0].device == 0);
  CHECK(plan->kill[0].after_messages == 50);
  CHECK(plan->kill[1].actor == transport::fault_actor::attention);
  CHECK(plan->kill[1].after_messages == 200);
  REQUIRE(plan->slow.size() == 1);
  CHECK(plan->slow[0].device == "expert:1");
  CHECK(plan->slow[0].factor == 3);
  fault_injector injector{*plan};
  CHECK(injector.slowdown("expert", 1) == 3);
  CHECK(injector.slowdown("expert", 0) == 1);
  CHECK(injector.slowdown("attention", 1) == 1);
  // Round trip through to_json.
  auto again = parse_fault_plan(to_json(*plan), "again");
  REQUIRE(again.ok());
  CHECK(to_json(*again) == to_json(*plan));
}

TEST_CASE("an empty plan injects nothing; retransmit settings parse") {
  auto plan = parse_fault_plan("{}", "empty.json");
  REQUIRE(plan.ok());
  CHECK(plan->empty());
  auto tuned = parse_fault_plan(R"({"drop": 0.5, "retransmit": {"ms": 5, "max_ms": 40, "max_retries": 30}})", "t");
  REQUIRE(tuned.ok());
  CHECK(tuned->retransmit_ms == 5);
  CHECK(tuned->retransmit_max_ms == 40);
  CHECK(tuned->max_retransmits == 30);
}

TEST_CASE("fault file errors name the file, the key and the value") {
  CHECK(error_of("[1]").find("JSON object") != std::string::npos);
  CHECK(error_of("{").find("not valid JSON") != std::string::npos);
  CHECK(error_of(R"({"dorp": 0.1})").find("'dorp' is not a fault plan key") != std::string::npos);
  CHECK(error_of(R"({"drop": 1.5})").find("'drop' must be a number from 0 to 1") != std::string::npos);
  CHECK(error_of(R"({"drop": "x"})").find("not \"x\"") != std::string::npos);
  CHECK(error_of(R"({"seed": -1})").find("'seed' must be an integer") != std::string::npos);
  CHECK(error_of(R"({"seed": 1.5})").find("'seed' must be an integer") != std::string::npos);
  CHECK(error_of(R"({"drop": 0.6, "duplicate": 0.6})").find("more than 1") != std::string::npos);
  CHECK(error_of(R"({"delay": 3})").find("'delay' must be an object") != std::string::npos);
  CHECK(error_of(R"({"delay": {"p": 1}})").find("'delay.p' is not a fault plan key") != std::string::npos);
  CHECK(error_of(R"({"delay": {"max_ms": -1}})").find("'delay.max_ms'") != std::string::npos);
  CHECK(error_of(R"({"kill": {}})").find("'kill' must be a list") != std::string::npos);
  CHECK(error_of(R"({"kill": [{"actor": "router"}]})").find("'kill[0].actor' must be expert, attention or queue") !=
        std::string::npos);
  CHECK(error_of(R"({"kill": [{"device": 0}]})").find("'kill[0].actor' is missing") != std::string::npos);
  CHECK(error_of(R"({"kill": [{"actor": "queue", "after": 3}]})").find("'kill[0].after'") != std::string::npos);
  CHECK(error_of(R"({"kill": [{"actor": "queue", "device": -2}]})").find("'kill[0].device'") != std::string::npos);
  CHECK(error_of(R"({"slow": [{"device": "gpu:1", "factor": 2}]})").find("'slow[0].device' must be") !=
        std::string::npos);
  CHECK(error_of(R"({"slow": [{"device": "expert:x"}]})").find("'slow[0].device'") != std::string::npos);
  CHECK(error_of(R"({"slow": [{"device": "expert:1", "factor": 0.5}]})").find("'slow[0].factor'") !=
        std::string::npos);
  CHECK(error_of(R"({"retransmit": {"ms": 0}})").find("'retransmit.ms'") != std::string::npos);
  CHECK(error_of(R"({"retransmit": {"ms": 10, "max_ms": 5}})").find("'retransmit.max_ms'") != std::string::npos);
  auto missing = load_fault_plan("/nonexistent/faults.json");
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.err().message.find("/nonexistent/faults.json") != std::string::npos);
}

TEST_CASE("decisions are a pure function of seed and message identity") {
  fault_plan plan;
  plan.seed = 7;
  plan.drop = plan.duplicate = plan.reorder = 0.1;
  plan.delay_probability = 0.2;
  plan.delay_max_ms = 5;
  fault_injector a{plan}, b{plan};
  plan.seed = 8;
  fault_injector other{plan};
  std::map<fault_action, std::size_t> histogram;
  std::size_t differ = 0;
  const std::size_t n = 20000;
  for (std::uint64_t i = 0; i < n; ++i) {
    auto d = a.decide(identity(i));
    auto again = b.decide_and_count(identity(i));
    REQUIRE(d.action == again.action);
    REQUIRE(d.delay_ms == again.delay_ms);
    REQUIRE(d.action == a.decide(identity(i)).action);  // asking twice changes nothing
    if (d.action == fault_action::delay) {
      REQUIRE(d.delay_ms >= 0);
      REQUIRE(d.delay_ms <= 5);
    }
    ++histogram[d.action];
    differ += other.decide(identity(i)).action != d.action;
  }
  // The rates follow the plan (binomial, n = 20000: 5 sigma is about 0.011 at p = 0.1).
  auto rate = [&](fault_action action) { return double(histogram[action]) / double(n); };
  CHECK(std::abs(rate(fault_action::drop) - 0.1) < 0.015);
  CHECK(std::abs(rate(fault_action::duplicate) - 0.1) < 0.015);
  CHECK(std::abs(rate(fault_action::reorder) - 0.1) < 0.015);
  CHECK(std::abs(rate(fault_action::delay) - 0.2) < 0.02);
  CHECK(differ > n / 4);  // another seed, other decisions
  auto counts = b.counts();
  CHECK(counts.messages == n);
  CHECK(counts.dropped == histogram[fault_action::drop]);
  CHECK(counts.duplicated == histogram[fault_action::duplicate]);
  CHECK(counts.reordered == histogram[fault_action::reorder]);
  CHECK(counts.delayed == histogram[fault_action::delay]);
  CHECK(a.counts().messages == 0);  // decide() does not count
}

TEST_CASE("a retransmission draws afresh: the attempt is part of the identity") {
  fault_plan plan;
  plan.seed = 3;
  plan.drop = 0.5;
  fault_injector injector{plan};
  std::size_t dropped_every_time = 0;
  for (std::uint64_t i = 0; i < 1000; ++i) {
    message_identity id = identity(i);
    bool all = true;
    for (std::uint32_t attempt = 0; attempt < 10; ++attempt) {
      id.attempt = attempt;
      all = all && injector.decide(id).action == fault_action::drop;
    }
    dropped_every_time += all;
  }
  CHECK(dropped_every_time <= 5);  // 0.5^10 × 1000 ≈ 1
}

TEST_CASE("kills fire once, at their threshold, and are named") {
  auto plan = parse_fault_plan(issue_file, "issue.json");
  REQUIRE(plan.ok());
  fault_injector injector{*plan};
  CHECK(injector.watches(transport::fault_actor::expert, 0));
  CHECK_FALSE(injector.watches(transport::fault_actor::expert, 1));
  CHECK_FALSE(injector.watches(transport::fault_actor::queue, 0));
  CHECK_FALSE(injector.kill_due(transport::fault_actor::expert, 0, 49));
  CHECK(injector.kills_text(transport::fault_actor::expert, 0).empty());
  auto due = injector.kill_due(transport::fault_actor::expert, 0, 50);
  REQUIRE(due);
  CHECK(due->after_messages == 50);
  CHECK_FALSE(injector.kill_due(transport::fault_actor::expert, 0, 51));  // once
  CHECK(injector.kills_text(transport::fault_actor::expert, 0) ==
        "the fault injector killed the expert actor of device 0 after 50 messages");
  CHECK(injector.counts().killed == 1);
}

TEST_CASE("node faults parse, round-trip, and fire once on their own node after their messages") {
  auto plan = parse_fault_plan(R"({"nodes": [{"node": "e1", "signal": "kill", "after_messages": 40},
                                             {"node": "e0", "signal": "stop", "after_messages": 30, "for_ms": 3000}]})",
                               "nodes.json");
  REQUIRE(plan.ok());
  REQUIRE(plan->nodes.size() == 2);
  CHECK(plan->nodes[0].node == "e1");
  CHECK(plan->nodes[0].signal == transport::fault_signal::kill);
  CHECK(plan->nodes[0].after_messages == 40);
  CHECK(plan->nodes[1].signal == transport::fault_signal::stop);
  CHECK(plan->nodes[1].for_ms == 3000);
  CHECK_FALSE(plan->empty());
  auto again = parse_fault_plan(to_json(*plan), "again");
  REQUIRE(again.ok());
  CHECK(to_json(*again) == to_json(*plan));

  transport::fault_injector on_e0{*plan};
  on_e0.watch_node("e0");
  transport::message_identity id;
  for (std::uint32_t i = 0; i < 29; ++i) {
    id.step = i;
    on_e0.decide_and_count(id);
    CHECK_FALSE(on_e0.node_fault_due());
  }
  on_e0.decide_and_count(id);
  auto due = on_e0.node_fault_due();
  REQUIRE(due);
  CHECK(due->node == "e0");
  CHECK(due->signal == transport::fault_signal::stop);
  CHECK_FALSE(on_e0.node_fault_due());  // once
  transport::fault_injector on_a0{*plan};
  on_a0.watch_node("a0");
  for (int i = 0; i < 100; ++i)
    on_a0.decide_and_count(id);
  CHECK_FALSE(on_a0.node_fault_due());
}

TEST_CASE("node fault errors name the file, the key and the value") {
  CHECK(error_of(R"({"nodes": {"node": "e1"}})").find("'nodes' must be a list") != std::string::npos);
  CHECK(error_of(R"({"nodes": [{"node": "e1", "signal": "kill", "after": 3}]})")
            .find("'nodes[0].after' is not a fault plan key") != std::string::npos);
  CHECK(error_of(R"({"nodes": [{"signal": "kill"}]})").find("'nodes[0].node' must be the name of a node") !=
        std::string::npos);
  CHECK(error_of(R"({"nodes": [{"node": "e1", "signal": "pause"}]})")
            .find("'nodes[0].signal' must be kill or stop, not \"pause\"") != std::string::npos);
  CHECK(error_of(R"({"nodes": [{"node": "e1"}]})").find("'nodes[0].signal' is missing") != std::string::npos);
  CHECK(error_of(R"({"nodes": [{"node": "e1", "signal": "stop"}]})").find("'nodes[0].for_ms' must be given") !=
        std::string::npos);
  CHECK(error_of(R"({"nodes": [{"node": "e1", "signal": "kill", "for_ms": 5}]})")
            .find("'nodes[0].for_ms' applies to stop only") != std::string::npos);
  CHECK(error_of(R"({"nodes": [{"node": "e1", "signal": "stop", "for_ms": -1}]})")
            .find("'nodes[0].for_ms' must be an integer from 0 to 3600000, not -1") != std::string::npos);
  CHECK(error_of(R"({"nodes": [{"node": "e1", "signal": "pause"}]})").find("f.json") == 0);
}

TEST_CASE("Engine::create refuses node faults without a cluster, or naming no node of it") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  auto plan = parse_fault_plan(R"({"nodes": [{"node": "e9", "signal": "kill", "after_messages": 1}]})", "n.json");
  REQUIRE(plan.ok());
  EngineConfig config;
  config.model_dir = dir.string();
  config.faults = *plan;
  auto alone = Engine::create(config);
  REQUIRE_FALSE(alone.ok());
  CHECK(alone.err().message.find("'nodes[0].node' 'e9': node faults need a cluster") != std::string::npos);

  cluster_config cluster;
  cluster.nodes = {{"a0", "127.0.0.1", 1, 1, 0}, {"e0", "127.0.0.1", 2, 0, 1}};
  config.cluster = cluster;
  auto unknown = Engine::create(config);  // refused before any node is asked (none listens)
  REQUIRE_FALSE(unknown.ok());
  CHECK(unknown.err().message.find("'e9' is not a node of the cluster (its nodes: a0, e0)") != std::string::npos);
}
