// The engine's default placement from the calibrated testbed (issue [P] part 3): on a small
// machine one device with every core runs attention and experts; tokens and logits stay
// bit-identical to the reference forward and to an explicit 1 + 1 placement.
#include <catch2/catch.hpp>

#include "core/rng.hpp"
#include "engine/engine.hpp"
#include "model/forward.hpp"
#include "policy/placement.hpp"
#include "policy/testbed_json.hpp"
#include "test_support.hpp"

#include <fstream>

using namespace moert;

namespace {

const char* small_model = test::small_moe_model;

policy::testbed cpu_testbed() {
  std::ifstream in{test::source_dir() / "configs" / "testbeds" / "cpu.json"};
  std::string text{std::istreambuf_iterator<char>(in), {}};
  auto bed = policy::parse_testbed(text, "cpu.json");
  REQUIRE(bed.ok());
  return *bed;
}

struct run_output {
  std::vector<std::vector<std::int32_t>> tokens;
  std::vector<std::vector<std::vector<float>>> logits;  // request × step × vocab
  std::string placement;
  std::vector<std::string> devices;
};

run_output run(const EngineConfig& config, const std::vector<Request>& requests) {
  auto engine = Engine::create(config);
  REQUIRE(engine.ok());
  run_output out;
  out.placement = (*engine)->placement();
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (const Request& r : requests)
    streams.push_back((*engine)->submit(r));
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
  for (const auto& d : (*engine)->report().devices)
    out.devices.push_back(d.name);
  return out;
}

std::vector<Request> requests_for(std::int64_t vocab, std::size_t count, std::size_t steps) {
  rng gen{12};
  std::vector<Request> requests;
  for (std::size_t i = 0; i < count; ++i) {
    std::vector<std::int32_t> prompt(1 + i * 3);
    for (auto& t : prompt)
      t = std::int32_t(gen.next_u64() % std::uint64_t(vocab));
    model::sampling_params sampling;
    if (i % 2 == 1)
      sampling = {0.8f, 40, 0.95f, 77};
    requests.push_back({i + 1, prompt, steps, sampling, true});
    requests.back().ignore_eos = true;
  }
  return requests;
}

// Tokens by the reference forward (KV cache), the oracle.
std::vector<std::vector<std::int32_t>> reference_tokens(const EngineConfig& config, const std::vector<Request>& requests) {
  std::unique_ptr<model::reference_model> ref;
  if (!config.model_dir.empty()) {
    auto loaded = model::load_checkpoint(config.model_dir);
    REQUIRE(loaded.ok());
    ref = std::make_unique<model::reference_model>(std::move(loaded->config), std::move(loaded->weights), 1);
  } else {
    auto c = model::parse_config(config.synthetic_config, "test");
    REQUIRE(c.ok());
    ref = std::make_unique<model::reference_model>(*c, model::synthetic_weights(*c, config.weight_seed), 1);
  }
  std::vector<model::generation_request> ref_requests;
  for (const Request& r : requests)
    ref_requests.push_back({r.id, r.prompt, r.max_new_tokens, r.sampling});
  auto expected = model::generate(*ref, ref_requests, model::decode_mode::kv_cache);
  REQUIRE(expected.ok());
  return *expected;
}

// Copies cost 10 ms each: no split can pay, the placement is the co-located one.
policy::testbed colocating_testbed() {
  policy::testbed bed = cpu_testbed();
  bed.comm.clear();
  bed.comm_default = policy::linear_fit{10.0, 0.0, 1.0};
  return bed;
}

void check_colocated(EngineConfig base, std::int64_t vocab) {
  auto requests = requests_for(vocab, 5, 6);
  auto expected = reference_tokens(base, requests);

  EngineConfig explicit_split = base;  // 1 + 1, one thread each: the old default
  auto split = run(explicit_split, requests);
  CHECK(split.placement == "1 attention + 1 expert devices, 1 threads each");
  CHECK(split.devices == std::vector<std::string>{"expert 0", "attention 0"});

  EngineConfig placed = base;
  placed.placement_testbed = colocating_testbed();
  placed.placement_cores = 2;
  auto colocated = run(placed, requests);
  INFO(colocated.placement);
  CHECK(colocated.placement.rfind("1 device (attention and experts), 2 threads; co-located", 0) == 0);
  CHECK(colocated.devices == std::vector<std::string>{"device 0"});

  CHECK(split.tokens == expected);
  CHECK(colocated.tokens == expected);
  CHECK(colocated.logits == split.logits);  // bit-identical, every step of every request
}

}  // namespace

TEST_CASE("co-located on 2 cores is one 2-thread device, bit-identical to 1 + 1 and the reference") {
  SECTION("a synthetic qwen2_moe with shared experts and a dense layer") {
    EngineConfig config;
    config.synthetic_config = small_model;
    config.weight_seed = 5;
    check_colocated(config, 211);
  }
  SECTION("the qwen3_moe_tiny fixture") {
    auto dir = test::fixture_dir("qwen3_moe_tiny");
    if (dir.empty())
      return;  // engine/engine reports the fixtures missing
    EngineConfig config;
    config.model_dir = dir.string();
    auto parsed = model::load_config(dir.string());
    REQUIRE(parsed.ok());
    check_colocated(config, parsed->vocab_size);
  }
}

TEST_CASE("with the calibrated cpu testbed the engine runs the placement the solver predicts best") {
  EngineConfig config;
  config.synthetic_config = small_model;
  config.weight_seed = 5;
  config.placement_testbed = cpu_testbed();
  config.placement_cores = 2;
  auto model = model::parse_config(small_model, "test");
  REQUIRE(model.ok());
  auto choice = policy::choose_placement(Engine::shape_of(*model), cpu_testbed(), 2);
  REQUIRE(choice.ok());
  auto requests = requests_for(211, 5, 6);
  auto got = run(config, requests);
  INFO(got.placement);
  CHECK(got.placement.find(choice->reason) != std::string::npos);
  CHECK(got.devices.size() == (choice->chosen.colocated ? 1 : choice->chosen.ag + choice->chosen.eg));
  CHECK(got.tokens == reference_tokens(config, requests));
}

TEST_CASE("a testbed where splitting pays places attention and experts apart, and stays bit-identical") {
  policy::testbed bed = cpu_testbed();
  bed.threads = 1;
  bed.gemm = {1.0, 1e-15, 1.0};  // start-up bound: overlapping it is what pays
  bed.attention = {0.0, 1e-15, 1.0};
  bed.shared_expert.reset();
  bed.comm_default = policy::linear_fit{0.0, 0.0, 1.0};
  EngineConfig config;
  config.synthetic_config = small_model;
  config.weight_seed = 5;
  config.placement_testbed = bed;
  config.placement_cores = 4;
  auto requests = requests_for(211, 5, 6);
  auto got = run(config, requests);
  INFO(got.placement);
  CHECK(got.placement.find("disaggregated") != std::string::npos);
  CHECK(got.devices.size() >= 2);
  CHECK(got.tokens == reference_tokens(config, requests));
}

TEST_CASE("an explicit placement is kept as given: no testbed, no change") {
  EngineConfig config;
  config.synthetic_config = small_model;
  config.attention_devices = 2;
  config.expert_devices = 3;
  auto model = model::parse_config(small_model, "test");
  REQUIRE(model.ok());
  auto placed = Engine::resolve_placement(config, *model);
  REQUIRE(placed.ok());
  CHECK(placed->empty());
  CHECK(config.attention_devices == 2);
  CHECK(config.expert_devices == 3);
  CHECK(!config.single_device);
}
