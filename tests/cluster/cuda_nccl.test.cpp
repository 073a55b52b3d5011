// Cluster transport "nccl" with real `moert node` processes: A2E and E2A rows between a cuda
// attention node and a cuda expert node go by NCCL (actors/tensor_link's pipes over
// transport/nccl_channel), the descriptors by CAF.
//
// - Without a GPU: every node makes its nccl_channel at bring-up and refuses, so
//   Engine::create fails naming the node and why (no CUDA device), before anything is hosted.
// - With two GPUs (scripts/gpu/check.sh runs this binary): 1 cuda attention node + 1 cuda
//   expert node over nccl give the cpu single-process greedy tokens on qwen3_moe_tiny, and the
//   rows went by the pipes. NCCL refuses two ranks of one communicator on one GPU, so with
//   fewer GPUs (this project's GPU machine has one H200) this case reports SKIPPED with the
//   reason (ctest: Not Run); it has not run anywhere yet.
// The link's descriptor and sequence logic runs without a GPU in tests/actors/tensor_link_nccl.

#include "cluster/cluster_harness.hpp"

#include "actors/runtime.hpp"

#include <cmath>

namespace {

std::vector<Request> greedy_requests(const fs::path& dir, std::size_t max_new_tokens) {
  auto requests = fixture_requests(dir, max_new_tokens);
  for (auto& r : requests)
    r.sampling = {};  // greedy: the tokens must be the cpu backend's
  return requests;
}

}  // namespace

TEST_CASE("nccl without a GPU: the bring-up fails naming the node and why", "[multiproc][gpu]") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  if (actors::check_backend(gpu::backend_kind::cuda).ok()) {
    std::printf("(this case only runs without a GPU: a CUDA device is present)\n");
    return;
  }
  node_fleet fleet;
  fleet.start("a0");
  fleet.start("e0");
  EngineConfig config;
  config.model_dir = dir.string();
  config.cluster_secret = cluster_secret();
  config.cluster = write_cluster("nccl-no-gpu.json", "nccl",
                                 {{"a0", fleet["a0"].address(), 1, 0, "cuda"},
                                  {"e0", fleet["e0"].address(), 0, 1, "cuda"}});
  std::string error;
  bool created = false;
  bounded("Engine::create over nccl without a GPU", 60s, [&] {
    auto engine = Engine::create(config);
    created = engine.ok();
    if (!created)
      error = engine.err().message;
  });
  std::printf("transport nccl without a GPU: Engine::create: %s\n", error.c_str());
  REQUIRE_FALSE(created);
  CHECK(error.find("node a0") != std::string::npos);
  CHECK(error.find("cluster transport nccl") != std::string::npos);
#ifdef MOERT_HAVE_NCCL_BUILD
  CHECK(error.find("no CUDA device") != std::string::npos);
#else
  CHECK(error.find("this build has no NCCL") != std::string::npos);
#endif
  CHECK(error.find("not built yet") == std::string::npos);
}

TEST_CASE("1 cuda attention + 1 cuda expert node over nccl give the cpu greedy tokens", "[multiproc][gpu]") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  if (auto usable = actors::check_backend(gpu::backend_kind::cuda); !usable.ok()) {
    test::skip_whole_binary("no GPU for the nccl cluster case: " + usable.err().message);
    return;
  }
  // NCCL refuses two ranks of one communicator on one GPU ("Duplicate GPU detected"): the two
  // nodes take GPUs 0 and 1 (process index mod GPUs visible).
  std::size_t gpus = 0;
  for (const gpu::backend_info& info : gpu::compiled_backends())
    if (info.kind == gpu::backend_kind::cuda)
      gpus = info.num_devices;
  if (gpus < 2) {
    test::skip_whole_binary("the nccl cluster case needs two CUDA devices (NCCL refuses two ranks of one "
                            "communicator on one GPU); " + std::to_string(gpus) + " visible");
    return;
  }
  auto requests = greedy_requests(dir, 8);
  auto reference = single_process_run(dir, requests, 1, 1);
  REQUIRE(reference.failure.empty());

  node_binary = MOERT_BINARY;
  node_fleet fleet{{"--backend", "cuda"}};
  fleet.start("a0");
  fleet.start("e0");
  EngineConfig config;
  config.model_dir = dir.string();
  config.cluster_secret = cluster_secret();
  config.cluster = write_cluster("nccl-cuda-nodes.json", "nccl",
                                 {{"a0", fleet["a0"].address(), 1, 0}, {"e0", fleet["e0"].address(), 0, 1}});
  auto t0 = steady::now();
  auto got = run_engine(config, requests, /*take_report=*/true);
  INFO(got.failure << "\nnode logs:\n" << fleet.logs());
  REQUIRE(got.failure.empty());
  double max_diff = 0;
  for (std::size_t i = 0; i < requests.size(); ++i) {
    INFO("request " << requests[i].id);
    CHECK(got.logs[i].tokens == reference.logs[i].tokens);
    for (std::size_t s = 0; s < std::min(got.logs[i].logits.size(), reference.logs[i].logits.size()); ++s)
      for (std::size_t v = 0; v < std::min(got.logs[i].logits[s].size(), reference.logs[i].logits[s].size()); ++v)
        max_diff = std::max(max_diff, double(std::fabs(got.logs[i].logits[s][v] - reference.logs[i].logits[s][v])));
  }
  std::printf("qwen3_moe_tiny, cuda a0 + cuda e0 over nccl: greedy tokens %s the cpu single process; max |logit "
              "diff| %.3g; %llu row messages, %llu bytes by the nodes' pipes (%.0f ms)\n",
              got.logs.size() == reference.logs.size() ? "compared with" : "NOT comparable to", max_diff,
              static_cast<unsigned long long>(got.report.cluster_ucx_messages),
              static_cast<unsigned long long>(got.report.cluster_ucx_bytes), ms_between(t0, steady::now()));
  CHECK(max_diff < 1e-3);
  // The rows went by the pipes (a failed pipe would have put them in CAF messages).
  CHECK(got.report.cluster_ucx_messages > 0);
}
