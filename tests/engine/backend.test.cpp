// EngineConfig::backend: asking for a backend this machine cannot run is an error from
// Engine::create that says why (not compiled in, or no GPU), before anything is loaded. Where
// the cuda backend can run (a GPU machine), the same request runs and gives the cpu backend's
// greedy tokens.
#include <catch2/catch.hpp>

#include "engine/engine.hpp"
#include "gpu/registry.hpp"

using namespace moert;

namespace {

const char* small_model = R"({"model_type": "qwen3_moe", "vocab_size": 97, "hidden_size": 32,
  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
  "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": true})";

// What this build and machine say about cuda: compiled in, usable, and why not.
gpu::backend_info cuda_info() {
  for (const gpu::backend_info& info : gpu::compiled_backends())
    if (info.kind == gpu::backend_kind::cuda)
      return info;
  return {gpu::backend_kind::cuda, false, 0, "not compiled"};
}

std::vector<std::int32_t> greedy(gpu::backend_kind backend) {
  EngineConfig config;
  config.synthetic_config = small_model;
  config.backend = backend;
  auto engine = Engine::create(config);
  REQUIRE(engine.ok());
  Request request;
  request.prompt = {3, 14, 15, 92};
  request.max_new_tokens = 6;
  auto tokens = (*engine)->submit(std::move(request))->wait();
  REQUIRE(tokens.ok());
  return *tokens;
}

}  // namespace

TEST_CASE("backend cpu is always there") {
  auto backends = gpu::compiled_backends();
  REQUIRE_FALSE(backends.empty());
  CHECK(backends.front().kind == gpu::backend_kind::cpu);
  CHECK(backends.front().usable);
  CHECK(greedy(gpu::backend_kind::cpu).size() == 6);
}

TEST_CASE("backend cuda: a clear error from Engine::create where it cannot run, else the cpu tokens", "[gpu]") {
  gpu::backend_info cuda = cuda_info();
  EngineConfig config;
  config.synthetic_config = small_model;
  config.backend = gpu::backend_kind::cuda;
  if (cuda.usable) {
    // A GPU is here, but the actor path is not on it yet: refused, naming why (whoever puts
    // the actors' activations on the device turns this into greedy(cuda) == greedy(cpu)).
    auto engine = Engine::create(config);
    REQUIRE_FALSE(engine.ok());
    INFO(engine.err().message);
    CHECK(engine.err().message.find("actor path runs on the cpu backend only") != std::string::npos);
    return;
  }
  auto engine = Engine::create(config);
  REQUIRE_FALSE(engine.ok());
  const std::string& message = engine.err().message;
  INFO(message);
  CHECK(message.find("backend 'cuda'") != std::string::npos);
  if (cuda.reason == "not compiled") {
    CHECK(engine.err().code == error_code::unsupported);
    CHECK(message.find("not compiled into this build") != std::string::npos);
  } else {
    // Compiled in, no GPU: the CUDA runtime's own reason (no driver here).
    CHECK(engine.err().code == error_code::device_error);
    CHECK(message.find("cannot run here") != std::string::npos);
    CHECK(message.find(cuda.reason) != std::string::npos);
  }
  // The check comes before loading: a missing checkpoint is not what is reported.
  EngineConfig missing;
  missing.model_dir = "/nonexistent/checkpoint";
  missing.backend = gpu::backend_kind::cuda;
  auto again = Engine::create(missing);
  REQUIRE_FALSE(again.ok());
  CHECK(again.err().message == message);
  WARN("backend cuda cannot run here (" << cuda.reason << "): only its error was checked, the GPU case did not run");
}
