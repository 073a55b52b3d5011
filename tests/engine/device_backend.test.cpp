// The engine's actor path on a backend whose memory is not host memory, proven without a GPU:
// tests/gpu/checked_backend.hpp stands in for cuda (cpu kernels, device memory apart and
// unreadable from the host, every pointer checked), registered through
// gpu::override_backend_for_tests. Tokens and logits must be the cpu backend's bit for bit,
// with no memory-rule violation on any device: the discipline a GPU needs (rows uploaded and
// downloaded around device steps, weights and KV cache resident per device). Also: per-device
// weights (an expert device holds only its experts' bytes) and the calibrated grouped/dense
// switch handed to the device backends.
#include <catch2/catch.hpp>

#include "engine/cluster_config.hpp"
#include "engine/engine.hpp"
#include "gpu/checked_backend.hpp"
#include "gpu/registry.hpp"
#include "model/weights.hpp"
#include "test_support.hpp"

#include <nlohmann/json.hpp>

#include <fstream>
#include <mutex>

using namespace moert;

namespace {

// qwen2_moe with a shared (gated) expert and a dense layer: the attention-side FFN path.
const char* shared_expert_model = test::small_moe_model;

// Makes backend_kind::cuda build checked backends while alive, and keeps what the engine asked.
class checked_cuda {
public:
  // fail_after: every backend's operation number fail_after fails as a CUDA call would (0: never).
  explicit checked_cuda(std::uint64_t fail_after = 0) {
    gpu::override_backend_for_tests(gpu::backend_kind::cuda, [this, fail_after](const gpu::backend_options& options) {
      auto b = std::make_unique<test::checked_backend>(options.num_threads,
                                                       "checked " + std::to_string(options.device_index));
      if (fail_after != 0)
        b->fail_after_operations(fail_after, "cudaErrorIllegalAddress (planted by the test)");
      std::lock_guard<std::mutex> guard{mutex_};
      made_.push_back(b.get());
      options_.push_back(options);
      return result<std::unique_ptr<gpu::backend>>(std::move(b));
    });
  }
  ~checked_cuda() { gpu::override_backend_for_tests(gpu::backend_kind::cuda, {}); }
  checked_cuda(const checked_cuda&) = delete;
  checked_cuda& operator=(const checked_cuda&) = delete;

  // Valid while the engine that made them lives.
  std::vector<test::checked_backend*> made() {
    std::lock_guard<std::mutex> guard{mutex_};
    return made_;
  }
  std::vector<gpu::backend_options> options() {
    std::lock_guard<std::mutex> guard{mutex_};
    return options_;
  }

private:
  std::mutex mutex_;
  std::vector<test::checked_backend*> made_;
  std::vector<gpu::backend_options> options_;
};

struct run_output {
  std::vector<std::vector<std::int32_t>> tokens;
  std::vector<std::vector<std::vector<float>>> logits;  // per request, per token
  EngineReport report;
  // Per checked device backend: its first violation (empty: none), operations, uploads, downloads.
  std::vector<std::string> violations;
  std::uint64_t operations = 0, uploads = 0, downloads = 0;
};

run_output run(const EngineConfig& config, const std::vector<std::vector<std::int32_t>>& prompts, std::size_t steps,
               checked_cuda* checked = nullptr) {
  auto engine = Engine::create(config);
  INFO((engine.ok() ? std::string{} : engine.err().message));
  REQUIRE(engine.ok());
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    Request r;
    r.id = i + 1;
    r.prompt = prompts[i];
    r.max_new_tokens = steps;
    r.return_logits = true;
    r.ignore_eos = true;
    r.deadline = std::chrono::seconds{60};  // bounds the waits below
    streams.push_back((*engine)->submit(std::move(r)));
  }
  run_output out;
  for (auto& stream : streams) {
    std::vector<std::int32_t> tokens;
    std::vector<std::vector<float>> logits;
    while (auto event = stream->next()) {
      REQUIRE(event->error.empty());
      tokens.push_back(event->token);
      logits.push_back(event->logits);
    }
    out.tokens.push_back(std::move(tokens));
    out.logits.push_back(std::move(logits));
  }
  (*engine)->shutdown();
  out.report = (*engine)->report();
  if (checked)
    for (test::checked_backend* b : checked->made()) {  // the engine (and its devices) still live
      out.violations.push_back(b->violation());
      out.operations += b->operations();
      out.uploads += b->uploads();
      out.downloads += b->downloads();
    }
  return out;
}

std::vector<std::vector<std::int32_t>> fixture_prompts(const std::filesystem::path& dir) {
  std::ifstream in{dir / "prompts.json"};
  return nlohmann::json::parse(in).get<std::vector<std::vector<std::int32_t>>>();
}

// The same run on the cpu backend and on checked device backends: identical bits, no violation.
void check_on_device_backend(EngineConfig config, const std::vector<std::vector<std::int32_t>>& prompts,
                             std::size_t steps) {
  config.backend = gpu::backend_kind::cpu;
  run_output want = run(config, prompts, steps);
  checked_cuda checked;
  config.backend = gpu::backend_kind::cuda;
  run_output got = run(config, prompts, steps, &checked);
  REQUIRE(got.violations.size() == config.attention_devices + config.expert_devices);
  for (const std::string& v : got.violations)
    CHECK(v == "");
  CHECK(got.operations > 0);
  CHECK(got.uploads > 0);    // E2A rows into the attention device, A2E rows into the expert device
  CHECK(got.downloads > 0);  // expert inputs, expert outputs and logits back to the host
  REQUIRE(got.tokens.size() == prompts.size());
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    INFO("request " << i);
    REQUIRE(got.tokens[i] == want.tokens[i]);
    REQUIRE(got.logits[i] == want.logits[i]);  // bit-identical
  }
  // Every device holds its own weights on its backend.
  for (const auto& dev : got.report.devices) {
    INFO(dev.name);
    CHECK(dev.weight_bytes > 0);
    CHECK(dev.backend.find("checked") != std::string::npos);
  }
}

}  // namespace

TEST_CASE("the actor path on a device backend (memory apart, every pointer checked) is the cpu backend's, bit for bit",
          "[gpu]") {
  for (std::string name : {"qwen3_moe_tiny", "mixtral_tiny", "deepseek_v2_tiny"}) {
    auto dir = test::fixture_dir(name);
    if (dir.empty()) {
      test::skip_whole_binary("../shared/fixtures not found");
      return;
    }
    INFO(name);
    EngineConfig config;
    config.model_dir = dir.string();
    config.attention_devices = 1;
    config.expert_devices = 1;
    check_on_device_backend(config, fixture_prompts(dir), 4);
  }
}

TEST_CASE("device backend: shared experts, a dense layer, micro-batches, chunked A2E and PPPipe", "[gpu]") {
  EngineConfig config;
  config.synthetic_config = shared_expert_model;
  config.weight_seed = 5;
  std::vector<std::vector<std::int32_t>> prompts{{1, 2, 3, 4, 5}, {9}, {100, 50, 25, 12, 6, 3, 1, 0}, {7, 7, 7}};
  for (auto order : {policy::segment_order::asas, policy::segment_order::aass, policy::segment_order::pppipe}) {
    INFO(to_string(order));
    config.plan = {2, 0, 2, order};
    config.attention_devices = 1;
    config.expert_devices = 2;
    check_on_device_backend(config, prompts, 5);
  }
}

TEST_CASE("a device backend's sticky error fails its task: every request ends with an error naming it, no hang",
          "[gpu]") {
  EngineConfig config;
  config.synthetic_config = shared_expert_model;
  config.weight_seed = 5;
  config.attention_devices = 1;
  config.expert_devices = 1;
  config.backend = gpu::backend_kind::cuda;
  checked_cuda checked{400};  // past start-up, inside the first decode steps
  auto engine = Engine::create(config);
  INFO((engine.ok() ? std::string{} : engine.err().message));
  REQUIRE(engine.ok());
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (std::uint64_t id = 1; id <= 3; ++id) {
    Request r;
    r.id = id;
    r.prompt = {1, 2, 3, static_cast<std::int32_t>(id)};
    r.max_new_tokens = 64;
    r.ignore_eos = true;
    r.deadline = std::chrono::seconds{30};  // bounds the waits below
    streams.push_back((*engine)->submit(std::move(r)));
  }
  for (auto& stream : streams) {
    std::string error;
    std::size_t tokens = 0;
    while (auto event = stream->next()) {
      if (!event->error.empty())
        error = event->error;
      else
        ++tokens;
    }
    INFO("tokens before the error: " << tokens << ", error: " << error);
    CHECK(tokens < 64);  // the failed device delivered nothing after its failure
    CHECK(error.find("cudaErrorIllegalAddress (planted by the test)") != std::string::npos);
    CHECK(error.find("deadline") == std::string::npos);  // ended by the failure, not by the deadline
  }
  (*engine)->shutdown();
}

TEST_CASE("the checked backend refuses host pointers, other devices' buffers and freed ones", "[gpu]") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  std::vector<float> host(64, 1.0f);
  {
    test::checked_backend a;
    gpu::buffer in = a.upload_floats(host);
    gpu::buffer out = a.allocate(host.size() * sizeof(float));
    a.add(out.floats(), in.floats(), host.size());
    CHECK(a.violation() == "");
    a.add(out.floats(), host.data(), host.size());  // a host vector where device memory belongs
    CHECK(a.violation().find("add: argument 'y'") != std::string::npos);
    CHECK(a.violation().find("host memory, not a buffer of this backend") != std::string::npos);
  }
  {
    test::checked_backend a, b;
    gpu::buffer theirs = b.allocate(64 * sizeof(float));
    gpu::buffer mine = a.allocate(64 * sizeof(float));
    a.add(mine.floats(), theirs.floats(), 64);
    CHECK(a.violation().find("device memory this backend did not allocate") != std::string::npos);
    CHECK(b.violation() == "");
    CHECK_FALSE(a.shares_memory_with(b));
    CHECK_FALSE(gpu::holds_host_memory(a));
  }
  {
    test::checked_backend a;
    gpu::buffer x = a.allocate(64 * sizeof(float));
    std::vector<std::size_t> positions{0};
    a.rope(x.floats(), 1, 64, 1, 64, 64, gpu::rope_style::rotate_half, x.floats(), positions.data());
    CHECK(a.violation().find("'table_host'") != std::string::npos);
    CHECK(a.violation().find("must be host memory") != std::string::npos);
  }
  {
    test::checked_backend a;
    const float* stale = nullptr;
    {
      gpu::buffer gone = a.allocate(64 * sizeof(float));
      stale = gone.floats();
    }
    std::vector<float> back(64);
    a.download(back.data(), stale, 64 * sizeof(float));
    CHECK(a.violation().find("did not allocate (another device's, or freed)") != std::string::npos);
  }
  {  // a matrix uploaded on another backend
    auto config = model::load_config(dir);
    REQUIRE(config.ok());
    auto ck = model::checkpoint::open(dir);
    REQUIRE(ck.ok());
    test::checked_backend a, b;
    auto w = model::load_weights(*config, *ck, {}, b);
    REQUIRE(w.ok());
    gpu::buffer x = a.allocate(std::size_t(config->hidden_size) * sizeof(float));
    gpu::buffer y = a.allocate(std::size_t(config->vocab_size) * sizeof(float));
    a.matmul(x.floats(), 1, w->lm_head, y.floats(), nullptr);
    CHECK(a.violation().find("matrix this backend did not upload") != std::string::npos);
    CHECK(b.violation() == "");
  }
}

TEST_CASE("per-device weights: an expert device holds only its experts, the attention device the rest") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  auto whole = model::load_checkpoint(dir);
  REQUIRE(whole.ok());
  const model::model_weights& w = whole->weights;
  std::size_t eg = 2;
  std::vector<std::size_t> expert_bytes(eg, 0);
  for (const auto& layer : w.layers)
    for (std::size_t e = 0; e < layer.experts.size(); ++e)
      expert_bytes[e % eg] += layer.experts[e].gate_up.num_bytes() + layer.experts[e].down.num_bytes();
  std::size_t total = model::resident_bytes(w).total();
  REQUIRE(expert_bytes[0] > 0);

  EngineConfig config;
  config.model_dir = dir.string();
  config.attention_devices = 1;
  config.expert_devices = eg;
  auto prompts = fixture_prompts(dir);
  run_output shared = run(config, prompts, 4);
  config.per_device_weights = true;
  run_output parts = run(config, prompts, 4);
  CHECK(parts.tokens == shared.tokens);
  CHECK(parts.logits == shared.logits);
  std::size_t sum = 0;
  for (const auto& dev : parts.report.devices) {
    INFO(dev.name);
    if (dev.name == "expert 0")
      CHECK(dev.weight_bytes == expert_bytes[0]);
    else if (dev.name == "expert 1")
      CHECK(dev.weight_bytes == expert_bytes[1]);
    else
      CHECK(dev.weight_bytes == total - expert_bytes[0] - expert_bytes[1]);
    sum += dev.weight_bytes;
  }
  CHECK(sum == total);
  for (const auto& dev : shared.report.devices)
    CHECK(dev.weight_bytes == 0);  // the shared host copy: no device holds its own

  // Host weights cannot be handed to devices that load their own part.
  EngineConfig preloaded;
  preloaded.weights = std::make_shared<const model::model_weights>(std::move(whole->weights));
  preloaded.weights_config = whole->config;
  preloaded.per_device_weights = true;
  auto refused = Engine::create(preloaded);
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.err().message.find("each device loads its own part") != std::string::npos);
}

TEST_CASE("the calibrated grouped/dense switch reaches every cuda device's backend; the report says which", "[gpu]") {
  EngineConfig config;
  config.synthetic_config = shared_expert_model;
  config.backend = gpu::backend_kind::cuda;
  config.expert_devices = 2;
  {
    checked_cuda checked;
    run_output out = run(config, {{1, 2, 3}}, 2, &checked);
    CHECK(out.report.expert_gemm_switch.find("not calibrated") != std::string::npos);
    for (const auto& options : checked.options())
      CHECK_FALSE(options.expert_gemm.calibrated);
  }
  {
    config.expert_gemm = policy::expert_gemm_crossover{std::size_t{96}, "test sweep"};
    checked_cuda checked;
    run_output out = run(config, {{1, 2, 3}}, 2, &checked);
    CHECK(out.report.expert_gemm_switch == "dense from 96 rows (calibrated: test sweep)");
    REQUIRE(checked.options().size() == 3);
    for (const auto& options : checked.options()) {
      CHECK(options.expert_gemm.calibrated);
      CHECK(options.expert_gemm.dense_min_rows == std::size_t{96});
      CHECK(options.expert_gemm.source == "test sweep");
    }
  }
  config.backend = gpu::backend_kind::cpu;
  CHECK(run(config, {{1, 2, 3}}, 2).report.expert_gemm_switch == "");
}

// Its bring-up (every node makes an nccl_channel: without a GPU each node refuses, naming
// itself and why) runs against real node processes in tests/cluster/cuda_nccl.
TEST_CASE("cluster transport nccl: parsed, with a backend per node", "[gpu]") {
  auto parsed = parse_cluster_config(R"({"transport": "nccl",
     "nodes": [{"name": "a0", "address": "127.0.0.1:7101", "attention_devices": 1, "backend": "cuda"},
               {"name": "e0", "address": "127.0.0.1:7102", "expert_devices": 1}]})",
                                     "c.json");
  REQUIRE(parsed.ok());
  CHECK(parsed->transport == cluster_transport::nccl);
  CHECK(std::string{to_string(parsed->transport)} == "nccl");
  CHECK(parsed->nodes[0].backend == "cuda");
  CHECK(parsed->nodes[1].backend.empty());  // the node's own --backend
  auto bad = parse_cluster_config(R"({"transport": "nccl",
     "nodes": [{"name": "a0", "address": "127.0.0.1:7101", "attention_devices": 1, "backend": "rocm"},
               {"name": "e0", "address": "127.0.0.1:7102", "expert_devices": 1}]})",
                                  "c.json");
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.err().message.find("nodes[0].backend") != std::string::npos);
}
