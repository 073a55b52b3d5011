// Clusters as users run them: real `moert node` processes on loopback, an Engine in this
// process whose shards and expert devices live in those nodes (EngineConfig::cluster), and a
// shared secret in a 0600 file. Tokens and every logit must be bit-identical to the
// single-process engine with the same numbers of devices, over every transport; a node
// killed or stopped mid-generation, with no other node to take over, must end every request
// with an error naming it, within the liveness bound. Every wait has a timeout; every node is killed at the end (RAII, and
// PR_SET_PDEATHSIG should this process die first).

#include "cluster/cluster_harness.hpp"

namespace {

struct topology {
  const char* label;
  std::vector<node_spec> nodes;  // addresses filled in from the fleet
};

// Every fixture over 1+2 and 2+3 nodes and every transport, against one process with the
// same numbers of devices. A failing transport does not stop the others: each one's result
// is printed, then the test fails naming the transports that failed.
void check_fixture(const std::string& name) {
  auto dir = test::fixture_dir(name);
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  auto requests = fixture_requests(dir, 5);
  node_fleet fleet;
  for (const char* n : {"a0", "a1", "e0", "e1", "e2"})
    fleet.start(n);
  std::vector<topology> topologies{
      {"1 attention + 2 expert nodes", {{"a0", "", 1, 0}, {"e0", "", 0, 1}, {"e1", "", 0, 1}}},
      {"2 attention + 3 expert nodes",
       {{"a0", "", 1, 0}, {"a1", "", 1, 0}, {"e0", "", 0, 1}, {"e1", "", 0, 1}, {"e2", "", 0, 1}}},
  };
  std::vector<std::string> failures;
  for (auto& topo : topologies) {
    std::size_t ag = 0, eg = 0;
    for (const auto& n : topo.nodes) {
      ag += n.attention_devices;
      eg += n.expert_devices;
    }
    auto reference = single_process_run(dir, requests, ag, eg);
    INFO(name << ", single process --ag " << ag << " --eg " << eg);
    REQUIRE(reference.failure.empty());

    for (const char* transport : transports) {
      for (const auto& restarted : fleet.revive())
        std::printf("  (restarted dead node %s)\n", restarted.c_str());
      for (auto& n : topo.nodes)
        n.address = fleet[n.name].address();
      EngineConfig config;
      config.model_dir = dir.string();
      config.cluster = write_cluster(name + "-" + std::to_string(ag) + "-" + std::to_string(eg) + "-" + transport +
                                         ".json",
                                     transport, topo.nodes);
      config.cluster_secret = cluster_secret();
      auto t0 = steady::now();
      auto got = run_engine(config, requests);
      std::string failure = got.failure.empty() ? compare_runs(reference.logs, got.logs) : got.failure;
      std::printf("%s, %s, transport %s: %s (%.0f ms)\n", name.c_str(), topo.label, transport,
                  failure.empty() ? "tokens and logits bit-identical to one process" : ("FAILED: " + failure).c_str(),
                  ms_between(t0, steady::now()));
      std::fflush(stdout);
      if (!failure.empty())
        failures.push_back(std::string{"transport "} + transport + ", " + topo.label + ": " + failure);
    }
  }
  std::string all;
  for (const auto& f : failures)
    all += "\n  " + f;
  INFO(name << ": failed runs:" << all << "\nnode logs:\n" << fleet.logs());
  CHECK(failures.empty());
}

}  // namespace

TEST_CASE("qwen3_moe_tiny across node processes is bit-identical to one process", "[multiproc]") {
  check_fixture("qwen3_moe_tiny");
}

TEST_CASE("mixtral_tiny across node processes is bit-identical to one process", "[multiproc]") {
  check_fixture("mixtral_tiny");
}

TEST_CASE("deepseek_v2_tiny across node processes is bit-identical to one process", "[multiproc]") {
  check_fixture("deepseek_v2_tiny");
}

// -- E2A bundles ---------------------------------------------------------------------------

// An expert device sends one E2A per A2E that reached it from another process (the outputs of
// every expert batch that ran its rows, mu_queue.hpp), not one per expert batch and
// destination: so the E2A crossing by UCX are at most the A2E (top-2 of 4 experts per device,
// several rows per A2E: one per expert batch would be about twice as many). Tokens and logits
// stay bit-identical to one process.
TEST_CASE("a 1+2 cluster sends at most one E2A per A2E across processes", "[multiproc]") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  auto requests = fixture_requests(dir, 5);
  auto reference = single_process_run(dir, requests, 1, 2);
  REQUIRE(reference.failure.empty());
  node_fleet fleet;
  for (const char* n : {"a0", "e0", "e1"})
    fleet.start(n);
  EngineConfig config;
  config.model_dir = dir.string();
  config.cluster = write_cluster("bundles.json", "ucx-tcp",
                                 {{"a0", fleet["a0"].address(), 1, 0},
                                  {"e0", fleet["e0"].address(), 0, 1},
                                  {"e1", fleet["e1"].address(), 0, 1}});
  config.cluster_secret = cluster_secret();
  auto got = run_engine(config, requests, /*take_report=*/true);
  INFO("node logs:\n" << fleet.logs());
  REQUIRE(got.failure.empty());
  CHECK(compare_runs(reference.logs, got.logs).empty());
  std::uint64_t e2a = got.report.cluster_ucx_e2a_messages;
  std::uint64_t a2e = got.report.cluster_ucx_messages - e2a;
  std::printf("bundles: %llu A2E and %llu E2A messages by UCX for %llu generated tokens\n",
              static_cast<unsigned long long>(a2e), static_cast<unsigned long long>(e2a),
              static_cast<unsigned long long>(got.report.tokens));
  CHECK(a2e > 0);
  CHECK(e2a > 0);
  CHECK(e2a <= a2e);
}

// -- liveness ----------------------------------------------------------------------------

namespace {

struct liveness_setup {
  int heartbeat_ms;
  int liveness_timeout_ms;
};

// A 1+1 cluster over caf generating several long requests; `strike` hits expert node e0, the
// only one (so nothing can take over its devices: tests/cluster/node_recovery.test.cpp has
// the recoveries), once tokens flow. Every request must end with an error naming e0, within
// `bound`; returns the detection time (strike -> first error event) in ms.
double detection_after(const liveness_setup& setup, const std::function<void(node_process&)>& strike,
                       std::chrono::milliseconds bound) {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return 0;
  }
  node_fleet fleet{{"--heartbeat-ms", std::to_string(setup.heartbeat_ms), "--liveness-timeout-ms",
                    std::to_string(setup.liveness_timeout_ms)}};
  for (const char* n : {"a0", "e0"})
    fleet.start(n);
  EngineConfig config;
  config.model_dir = dir.string();
  config.cluster = write_cluster("liveness.json", "caf",
                                 {{"a0", fleet["a0"].address(), 1, 0}, {"e0", fleet["e0"].address(), 0, 2}},
                                 setup.heartbeat_ms, setup.liveness_timeout_ms);
  config.cluster_secret = cluster_secret();
  std::unique_ptr<Engine> engine;
  std::string create_error;
  bounded("Engine::create", 60s, [&] {
    auto created = Engine::create(config);
    if (created.ok())
      engine = std::move(*created);
    else
      create_error = created.err().message;
  });
  INFO(create_error << "\n" << fleet.logs());
  REQUIRE(engine);

  // Long enough that no request can finish before the strike (the fixture allows 4096).
  const std::size_t count = 6;
  collector events{count};
  for (std::size_t i = 0; i < count; ++i) {
    Request r;
    r.id = 100 + i;
    r.prompt = {1 + std::int32_t(i), 17, 33, 2};
    r.max_new_tokens = 3000;
    r.ignore_eos = true;
    if (i % 2)
      r.sampling = {0.9f, 0, 1.0f, 3};
    engine->submit(r, events.sink(i));
  }
  REQUIRE(events.wait_tokens(2 * count, 60s));  // generation is under way
  auto struck = steady::now();
  strike(fleet["e0"]);
  bool all_ended = events.wait_all(bound + 5s);
  auto logs = events.snapshot();
  auto first_error = events.first_error();
  if (!all_ended)
    for (std::size_t i = 0; i < count; ++i)
      engine->cancel(100 + i);
  auto shutdown_start = steady::now();
  bounded("Engine::shutdown after a lost node", 30s, [&] { engine->shutdown(); });
  bounded("~Engine after a lost node", 30s, [&] { engine.reset(); });
  double shutdown_ms = ms_between(shutdown_start, steady::now());

  REQUIRE(all_ended);
  REQUIRE(first_error != steady::time_point{});
  double detection_ms = ms_between(struck, first_error);
  double last_end_ms = 0;
  for (std::size_t i = 0; i < count; ++i) {
    INFO("request " << 100 + i << ": " << logs[i].tokens.size() << " tokens, error '" << logs[i].error << "'");
    CHECK(logs[i].finish == FinishReason::error);
    CHECK(logs[i].error.find("node e0") != std::string::npos);
    CHECK(logs[i].tokens.size() < 3000);
    last_end_ms = std::max(last_end_ms, ms_between(struck, logs[i].end_time));
  }
  std::printf("  detection %.0f ms (strike -> first error), every request ended %.0f ms after the strike, "
              "shutdown %.0f ms; error: %s\n",
              detection_ms, last_end_ms, shutdown_ms, logs[0].error.c_str());
  std::fflush(stdout);
  CHECK(detection_ms < double(bound.count()));
  CHECK(last_end_ms < double(bound.count()));
  return detection_ms;
}

}  // namespace

TEST_CASE("SIGKILL of the only expert node mid-generation ends every request with an error naming it",
          "[multiproc][liveness]") {
  std::printf("SIGKILL of expert node e0, the only one (heartbeat 200 ms, liveness timeout 1500 ms):\n");
  detection_after({200, 1500}, [](node_process& node) { node.signal(SIGKILL); }, 5000ms);
}

TEST_CASE("SIGSTOP of the only expert node is noticed within the liveness timeout", "[multiproc][liveness]") {
  std::printf("SIGSTOP of expert node e0, the only one (heartbeat 100 ms, liveness timeout 1000 ms):\n");
  // The bound: the timeout, one heartbeat for CAF to look, and slack for a loaded machine.
  detection_after({100, 1000}, [](node_process& node) { node.signal(SIGSTOP); }, 2500ms);
  // The fleet's destructor sends SIGCONT, then SIGKILL.
}

TEST_CASE("a cluster whose node is not running fails Engine::create naming the node", "[multiproc][liveness]") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  node_fleet fleet;
  fleet.start("a0");
  fleet.start("e0");
  auto vacant = free_ports(1)[0];  // nobody listens there
  EngineConfig config;
  config.model_dir = dir.string();
  config.cluster = write_cluster("missing-node.json", "caf",
                                 {{"a0", fleet["a0"].address(), 1, 0},
                                  {"e0", fleet["e0"].address(), 0, 1},
                                  {"e1", "127.0.0.1:" + std::to_string(vacant), 0, 1}});
  config.cluster_secret = cluster_secret();
  config.cluster_timeout = 2000ms;
  std::string error;
  bool created = false;
  auto t0 = steady::now();
  bounded("Engine::create with a missing node", 30s, [&] {
    auto engine = Engine::create(config);
    created = engine.ok();
    if (!created)
      error = engine.err().message;
  });
  double ms = ms_between(t0, steady::now());
  std::printf("missing node e1: Engine::create failed after %.0f ms: %s\n", ms, error.c_str());
  REQUIRE_FALSE(created);
  CHECK(error.find("node e1") != std::string::npos);
  CHECK(ms < 2000 + 3000);

  // A node that accepts the connection and then never answers (stopped): bring-up gives up
  // after cluster_timeout and names it.
  auto e1 = &fleet.start("e1");
  e1->signal(SIGSTOP);
  config.cluster = write_cluster("stopped-node.json", "caf",
                                 {{"a0", fleet["a0"].address(), 1, 0},
                                  {"e0", fleet["e0"].address(), 0, 1},
                                  {"e1", e1->address(), 0, 1}});
  error.clear();
  t0 = steady::now();
  bounded("Engine::create with a stopped node", 30s, [&] {
    auto engine = Engine::create(config);
    created = engine.ok();
    if (!created)
      error = engine.err().message;
  });
  ms = ms_between(t0, steady::now());
  std::printf("stopped node e1: Engine::create failed after %.0f ms (cluster_timeout 2000 ms): %s\n", ms,
              error.c_str());
  REQUIRE_FALSE(created);
  CHECK(error.find("node e1") != std::string::npos);
  CHECK(ms < 2000 + 3000);
  e1->kill_and_reap();

  // The nodes that were asked stay usable: a complete cluster on them works.
  e1 = &fleet.start("e1");
  config.cluster = write_cluster("missing-node-fixed.json", "caf",
                                 {{"a0", fleet["a0"].address(), 1, 0},
                                  {"e0", fleet["e0"].address(), 0, 1},
                                  {"e1", e1->address(), 0, 1}});
  config.cluster_timeout = 30000ms;
  auto run = run_engine(config, fixture_requests(dir, 3));
  INFO(run.failure << "\n" << fleet.logs());
  CHECK(run.failure.empty());
}

TEST_CASE("a wrong secret is refused with an error naming the node, without a hang", "[multiproc][liveness]") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  node_fleet fleet;
  for (const char* n : {"a0", "e0", "e1"})
    fleet.start(n);
  EngineConfig config;
  config.model_dir = dir.string();
  config.cluster = write_cluster("wrong-secret.json", "caf",
                                 {{"a0", fleet["a0"].address(), 1, 0},
                                  {"e0", fleet["e0"].address(), 0, 1},
                                  {"e1", fleet["e1"].address(), 0, 1}});
  config.cluster_secret = "not-the-cluster-secret";
  config.cluster_timeout = 3000ms;
  std::string error;
  bool created = false;
  auto t0 = steady::now();
  bounded("Engine::create with a wrong secret", 30s, [&] {
    auto engine = Engine::create(config);
    created = engine.ok();
    if (!created)
      error = engine.err().message;
  });
  double ms = ms_between(t0, steady::now());
  std::printf("wrong secret: Engine::create failed after %.0f ms: %s\n", ms, error.c_str());
  REQUIRE_FALSE(created);
  CHECK(error.find("node a0") != std::string::npos);
  CHECK(ms < 3000 + 5000);

  // The nodes keep serving peers that hold the secret.
  for (const char* n : {"a0", "e0", "e1"})
    CHECK(fleet[n].running());
  config.cluster_secret = cluster_secret();
  config.cluster_timeout = 30000ms;
  auto run = run_engine(config, fixture_requests(dir, 3));
  INFO(run.failure << "\n" << fleet.logs());
  CHECK(run.failure.empty());
}

// -- node to node ----------------------------------------------------------------------

TEST_CASE("A2E and E2A go node to node: this process's gates carry control only", "[multiproc]") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  node_fleet fleet;
  for (const char* n : {"a0", "e0", "e1"})
    fleet.start(n);
  EngineConfig config;
  config.model_dir = dir.string();
  // Transport caf: the rows travel inside the CAF messages, so rows routed through this
  // process would show in its gates' byte counts.
  config.cluster = write_cluster("node-to-node.json", "caf",
                                 {{"a0", fleet["a0"].address(), 1, 0},
                                  {"e0", fleet["e0"].address(), 0, 1},
                                  {"e1", fleet["e1"].address(), 0, 1}});
  config.cluster_secret = cluster_secret();
  auto requests = fixture_requests(dir, 8);
  std::size_t tokens = 0;
  for (auto& r : requests) {
    r.return_logits = false;  // logits come to this process by design: keep them out of the count
    r.return_prompt_logits = false;
    tokens += r.prompt.size() + r.max_new_tokens;
  }
  std::unique_ptr<Engine> engine;
  std::string create_error;
  bounded("Engine::create", 120s, [&] {
    auto created = Engine::create(config);
    if (created.ok())
      engine = std::move(*created);
    else
      create_error = created.err().message;
  });
  INFO(create_error << "\n" << fleet.logs());
  REQUIRE(engine);
  std::uint64_t before = 0;  // bring-up: the handles and the plan
  bounded("Engine::report", 30s, [&] { before = engine->report().cluster_caf_bytes; });
  collector events{requests.size()};
  for (std::size_t i = 0; i < requests.size(); ++i)
    engine->submit(requests[i], events.sink(i));
  bool all_ended = events.wait_all(120s);
  // report() on this thread and ~Engine on one of bounded()'s: a regression test for a
  // thread that made a CAF scoped_actor pinning the actor system (tests/engine/caller_threads).
  // report() waits at most 2 s per node.
  EngineReport report = engine->report();
  bounded("Engine::shutdown", 60s, [&] { engine->shutdown(); });
  bounded("~Engine", 60s, [&] { engine.reset(); });
  REQUIRE(all_ended);
  for (const auto& log : events.snapshot())
    REQUIRE(log.error.empty());

  // Every token crosses A2E and E2A on each layer with top_k rows of hidden floats.
  auto cfg = json::parse(slurp(dir / "config.json"));
  double row_bytes = double(tokens) * cfg["num_hidden_layers"].get<double>() *
                     cfg["num_experts_per_tok"].get<double>() * cfg["hidden_size"].get<double>() * 4 * 2;
  double through_gates = double(report.cluster_caf_bytes - before);
  std::printf("node to node: %.0f bytes through this process's gates for %zu tokens (%.0f B/token); the rows are "
              "%.0f bytes (%.0f B/token)\n",
              through_gates, tokens, through_gates / double(tokens), row_bytes, row_bytes / double(tokens));
  // Routed through this process, the rows would pass two of its gates (in from a0, out to
  // e0/e1): at least twice row_bytes.
  CHECK(through_gates < row_bytes / 2);
}
