// Cluster nodes on a device backend: `moert node --backend cuda`, or a node's "backend" in the
// cluster file. Each device of such a node holds only its own part of the weights on its
// backend, as the engine's devices do in one process (actors::make_device_with_weights).
//
// - On a machine without a GPU a real `moert node --backend cuda` starts, says why it cannot
//   host, and the engine's bring-up fails naming that node and the reason (also when the
//   cluster file asks a cpu node for cuda).
// - The cuda data path of the nodes runs here on the checked stand-in backend
//   (tests/cluster/checked_node.cpp: device memory the host cannot read, every pointer
//   checked): 1 attention + 1 expert cuda node must give the cpu single-process tokens and
//   logits bit for bit, over every transport but nccl (tests/cluster/cuda_nccl needs GPUs).

#include "cluster/cluster_harness.hpp"

#include "actors/runtime.hpp"

namespace {

// The nodes' `--backend cuda` bring-up error, from real `moert node` processes.
std::string bring_up_error(const EngineConfig& config) {
  std::string error;
  bool created = false;
  bounded("Engine::create on a cuda node without a GPU", 60s, [&] {
    auto engine = Engine::create(config);
    created = engine.ok();
    if (!created)
      error = engine.err().message;
  });
  REQUIRE_FALSE(created);
  return error;
}

}  // namespace

TEST_CASE("a cuda node without a GPU: the bring-up reports that node's error and why", "[multiproc]") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  if (actors::check_backend(gpu::backend_kind::cuda).ok()) {
    std::printf("SKIPPED (this case only): a CUDA device is present, so --backend cuda can run here\n");
    return;
  }
  node_binary = MOERT_BINARY;
  std::string why = actors::check_backend(gpu::backend_kind::cuda).err().message;

  // --backend cuda on the node's command line.
  node_fleet cpu_fleet;
  cpu_fleet.start("a0");
  node_fleet cuda_fleet{{"--backend", "cuda"}};
  auto& e0 = cuda_fleet.start("e0");
  INFO(e0.log());
  CHECK(e0.log().find("backend cuda") != std::string::npos);
  CHECK(e0.log().find("error: --backend cuda: " + why) != std::string::npos);
  EngineConfig config;
  config.model_dir = dir.string();
  config.cluster_secret = cluster_secret();
  config.cluster = write_cluster("cuda-node-no-gpu.json", "caf",
                                 {{"a0", cpu_fleet["a0"].address(), 1, 0}, {"e0", e0.address(), 0, 1}});
  std::string error = bring_up_error(config);
  std::printf("--backend cuda on node e0 without a GPU: Engine::create: %s\n", error.c_str());
  CHECK(error.find("node e0") != std::string::npos);
  CHECK(error.find("backend 'cuda' cannot run here") != std::string::npos);
  CHECK(error.find(why) != std::string::npos);

  // "backend": "cuda" in the cluster file, for a node started on cpu.
  cpu_fleet.start("e1");
  config.cluster = write_cluster("cuda-in-file-no-gpu.json", "caf",
                                 {{"a0", cpu_fleet["a0"].address(), 1, 0},
                                  {"e1", cpu_fleet["e1"].address(), 0, 1, "cuda"}});
  error = bring_up_error(config);
  std::printf("\"backend\": \"cuda\" for node e1 without a GPU: Engine::create: %s\n", error.c_str());
  CHECK(error.find("node e1") != std::string::npos);
  CHECK(error.find("backend 'cuda' cannot run here") != std::string::npos);

  // The refused nodes serve the next engine: the same nodes on cpu work.
  config.cluster = write_cluster("cpu-after-refusal.json", "caf",
                                 {{"a0", cpu_fleet["a0"].address(), 1, 0}, {"e1", cpu_fleet["e1"].address(), 0, 1}});
  auto run = run_engine(config, fixture_requests(dir, 2));
  INFO(run.failure << "\n" << cpu_fleet.logs());
  CHECK(run.failure.empty());
}

TEST_CASE("cuda nodes (checked stand-in backend) give the cpu single-process tokens and logits", "[multiproc]") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  auto requests = fixture_requests(dir, 4);
  auto reference = single_process_run(dir, requests, 1, 2);
  REQUIRE(reference.failure.empty());

  node_binary = MOERT_CHECKED_NODE;
  // a0 and e0 run cuda from their command line; e1 runs cpu unless the file says otherwise.
  node_fleet cuda_fleet{{"--backend", "cuda"}};
  cuda_fleet.start("a0");
  cuda_fleet.start("e0");
  node_fleet cpu_fleet;
  cpu_fleet.start("e1");
  node_binary = MOERT_BINARY;
  std::vector<std::string> failures;
  for (const char* transport : transports) {
    for (const char* e1_backend : {"cuda", "cpu"}) {
      EngineConfig config;
      config.model_dir = dir.string();
      config.cluster_secret = cluster_secret();
      config.cluster = write_cluster(std::string("cuda-nodes-") + transport + "-" + e1_backend + ".json", transport,
                                     {{"a0", cuda_fleet["a0"].address(), 1, 0},
                                      {"e0", cuda_fleet["e0"].address(), 0, 1},
                                      {"e1", cpu_fleet["e1"].address(), 0, 1, e1_backend}});
      auto t0 = steady::now();
      auto got = run_engine(config, requests);
      std::string failure = got.failure.empty() ? compare_runs(reference.logs, got.logs) : got.failure;
      std::printf("qwen3_moe_tiny, cuda a0 + cuda e0 + %s e1, transport %s: %s (%.0f ms)\n", e1_backend, transport,
                  failure.empty() ? "tokens and logits bit-identical to one cpu process" : ("FAILED: " + failure).c_str(),
                  ms_between(t0, steady::now()));
      std::fflush(stdout);
      if (!failure.empty())
        failures.push_back(std::string("transport ") + transport + ", e1 " + e1_backend + ": " + failure);
    }
  }
  std::string all;
  for (const auto& f : failures)
    all += "\n  " + f;
  INFO("failed runs:" << all << "\nnode logs:\n" << cuda_fleet.logs() << cpu_fleet.logs());
  CHECK(failures.empty());
  // The nodes' devices really ran the stand-in, each holding its own part of the weights
  // (node_host logs each device it builds off cpu); e1 only when the file said cuda.
  CHECK(cuda_fleet["a0"].log().find("backend cuda") != std::string::npos);
  CHECK(cuda_fleet["a0"].log().find("a0: attention 0 on checked") != std::string::npos);
  CHECK(cuda_fleet["e0"].log().find("e0: expert 0 on checked") != std::string::npos);
  CHECK(cpu_fleet["e1"].log().find("e1: expert 1 on checked") != std::string::npos);
  CHECK(cpu_fleet["e1"].log().find("backend cpu") != std::string::npos);
}
