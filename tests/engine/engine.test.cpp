// The actor data path against the reference forward: tokens and logits bit-identical over
// placements, plans and queue schedulers; continuous batching under concurrent submission;
// bad requests and cancellation.
#include <catch2/catch.hpp>

#include "core/rng.hpp"
#include "engine/engine.hpp"
#include "model/forward.hpp"
#include "policy/testbed_json.hpp"
#include "test_support.hpp"

#include <nlohmann/json.hpp>

#include <atomic>
#include <fstream>
#include <thread>

using namespace moert;

namespace {

const char* small_model = test::small_moe_model;

std::unique_ptr<model::reference_model> reference_for(const EngineConfig& config) {
  if (!config.model_dir.empty()) {
    auto loaded = model::load_checkpoint(config.model_dir);
    REQUIRE(loaded.ok());
    return std::make_unique<model::reference_model>(std::move(loaded->config), std::move(loaded->weights), 1);
  }
  auto c = model::parse_config(config.synthetic_config, "test");
  return std::make_unique<model::reference_model>(*c, model::synthetic_weights(*c, config.weight_seed), 1);
}

// Logits of every position of prompt + generated, by one full-recompute forward.
std::vector<float> reference_logits(model::reference_model& ref, const std::vector<std::int32_t>& prompt,
                                    const std::vector<std::int32_t>& generated) {
  std::vector<std::int32_t> all = prompt;
  all.insert(all.end(), generated.begin(), generated.end() - 1);
  model::kv_cache cache{ref.config()};
  std::vector<model::forward_segment> seg{{&cache, all}};
  auto logits = ref.forward(seg, model::logits_for::every_token);
  REQUIRE(logits.ok());
  return logits.value();
}

struct run_output {
  std::vector<std::int32_t> tokens;
  std::vector<std::vector<float>> logits;
};

std::vector<run_output> run_engine(const EngineConfig& config, const std::vector<Request>& requests) {
  auto engine = Engine::create(config);
  REQUIRE(engine.ok());
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (const Request& r : requests)
    streams.push_back((*engine)->submit(r));
  std::vector<run_output> out;
  for (auto& stream : streams) {
    run_output o;
    while (auto event = stream->next()) {
      REQUIRE(event->error.empty());
      o.tokens.push_back(event->token);
      o.logits.push_back(event->logits);
    }
    out.push_back(std::move(o));
  }
  (*engine)->shutdown();
  return out;
}

void check_equivalence(EngineConfig base, const std::vector<std::vector<std::int32_t>>& prompts, std::size_t steps,
                       std::size_t num_samples) {
  auto ref = reference_for(base);
  std::size_t vocab = std::size_t(ref->config().vocab_size);
  std::vector<model::generation_request> ref_requests;
  std::vector<Request> requests;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    model::sampling_params sampling;
    if (i % 2 == 1)
      sampling = {0.8f, 40, 0.95f, 77};  // every other request samples
    ref_requests.push_back({i + 1, prompts[i], steps, sampling});
    requests.push_back({i + 1, prompts[i], steps, sampling, true});
    requests.back().ignore_eos = true;  // the fixtures have an EOS; the reference runs `steps` tokens
  }
  auto expected = model::generate(*ref, ref_requests, model::decode_mode::kv_cache);
  REQUIRE(expected.ok());
  std::vector<std::vector<float>> expected_logits;
  for (std::size_t i = 0; i < prompts.size(); ++i)
    expected_logits.push_back(reference_logits(*ref, prompts[i], (*expected)[i]));

  rng pick{2026};
  const std::size_t ags[] = {1, 2, 3}, egs[] = {1, 2, 4}, r1s[] = {1, 2, 3}, r2s[] = {1, 2};
  const policy::segment_order orders[] = {policy::segment_order::aass, policy::segment_order::asas,
                                          policy::segment_order::pppipe};
  const policy::queue_policy schedulers[] = {policy::queue_policy::defrag, policy::queue_policy::mtfs,
                                             policy::queue_policy::flfs};
  for (std::size_t sample = 0; sample < num_samples; ++sample) {
    EngineConfig config = base;
    config.attention_devices = ags[pick.next_u64() % 3];
    config.expert_devices = std::min<std::size_t>(egs[pick.next_u64() % 3], std::size_t(ref->config().num_experts));
    config.plan.r1 = r1s[pick.next_u64() % 3];
    config.plan.r2 = r2s[pick.next_u64() % 2];
    config.plan.order = orders[pick.next_u64() % 3];
    config.scheduler = schedulers[pick.next_u64() % 3];
    config.threads_per_device = 1 + pick.next_u64() % 2;
    INFO("ag " << config.attention_devices << " eg " << config.expert_devices << " r1 " << config.plan.r1 << " r2 "
               << config.plan.r2 << " order " << to_string(config.plan.order) << " scheduler "
               << to_string(config.scheduler));
    auto got = run_engine(config, requests);
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      INFO("request " << i);
      REQUIRE(got[i].tokens == (*expected)[i]);
      for (std::size_t s = 0; s < steps; ++s) {
        std::size_t row = prompts[i].size() - 1 + s;
        std::vector<float> want(expected_logits[i].begin() + std::ptrdiff_t(row * vocab),
                                expected_logits[i].begin() + std::ptrdiff_t((row + 1) * vocab));
        REQUIRE(got[i].logits[s] == want);  // bit-identical
      }
    }
  }
}

std::vector<std::vector<std::int32_t>> fixture_prompts(const std::filesystem::path& dir) {
  std::ifstream in{dir / "prompts.json"};
  return nlohmann::json::parse(in).get<std::vector<std::vector<std::int32_t>>>();
}

}  // namespace

TEST_CASE("fixtures through the actor path are bit-identical to the reference forward") {
  for (std::string name : {"qwen3_moe_tiny", "mixtral_tiny"}) {
    auto dir = test::fixture_dir(name);
    if (dir.empty()) {
      test::skip_whole_binary("../shared/fixtures not found");
      return;
    }
    INFO(name);
    EngineConfig config;
    config.model_dir = dir.string();
    check_equivalence(config, fixture_prompts(dir), 8, 24);
  }
}

TEST_CASE("a qwen2_moe-style model with shared experts and a dense layer is bit-identical too") {
  EngineConfig config;
  config.synthetic_config = small_model;
  config.weight_seed = 5;
  check_equivalence(config, {{1, 2, 3, 4, 5}, {9}, {100, 50, 25, 12, 6, 3, 1, 0}, {7, 7, 7}}, 6, 16);
}

TEST_CASE("continuous batching: 64 requests from 4 threads each get exactly their tokens") {
  EngineConfig config;
  config.synthetic_config = small_model;
  config.attention_devices = 2;
  config.expert_devices = 2;
  config.plan = {2, 0, 2, policy::segment_order::asas};
  auto ref = reference_for(config);
  rng gen{99};
  std::vector<Request> requests;
  std::vector<model::generation_request> ref_requests;
  for (std::uint64_t i = 0; i < 64; ++i) {
    std::vector<std::int32_t> prompt(1 + gen.next_u64() % 20);
    for (auto& t : prompt)
      t = std::int32_t(gen.next_u64() % 211);
    std::size_t steps = 1 + gen.next_u64() % 10;
    model::sampling_params sampling;
    if (i % 3 == 0)
      sampling = {1.0f, 0, 0.9f, 5};
    requests.push_back({1000 + i, prompt, steps, sampling, false});
    ref_requests.push_back({1000 + i, prompt, steps, sampling});
  }
  auto expected = model::generate(*ref, ref_requests, model::decode_mode::kv_cache);
  REQUIRE(expected.ok());

  auto engine = Engine::create(config);
  REQUIRE(engine.ok());
  std::vector<std::shared_ptr<TokenStream>> streams(64);
  std::vector<std::atomic<int>> last_events(64);
  std::vector<std::thread> clients;
  for (std::size_t t = 0; t < 4; ++t)
    clients.emplace_back([&, t] {
      rng jitter{t};
      for (std::size_t i = t; i < 64; i += 4) {
        std::this_thread::sleep_for(std::chrono::microseconds(jitter.next_u64() % 3000));
        streams[i] = (*engine)->submit(requests[i], [&, i](const TokenEvent& e) {
          if (e.last)
            ++last_events[i];
        });
      }
    });
  for (auto& c : clients)
    c.join();
  for (std::size_t i = 0; i < 64; ++i) {
    auto tokens = streams[i]->wait();
    REQUIRE(tokens.ok());
    CHECK(*tokens == (*expected)[i]);
  }
  (*engine)->shutdown();
  for (std::size_t i = 0; i < 64; ++i)
    CHECK(last_events[i] == 1);  // answered once, never twice
  auto report = (*engine)->report();
  std::size_t total = 0;
  for (const auto& r : ref_requests)
    total += r.max_new_tokens;
  CHECK(report.tokens == total);
}

TEST_CASE("a decode arms one at-least-once timer per micro-batch and timeout, not one per layer and step") {
  // One per (step, layer) was 8 CAF clock wake-ups per token on the bench model, each firing a
  // second later on a CAF worker while the device computed.
  EngineConfig config;
  config.synthetic_config = small_model;
  auto ref = reference_for(config);
  std::vector<std::int32_t> prompt{5, 17, 99, 3};
  constexpr std::size_t steps = 48;
  std::vector<model::generation_request> ref_requests{{1, prompt, steps, {}}};
  auto expected = model::generate(*ref, ref_requests, model::decode_mode::kv_cache);
  REQUIRE(expected.ok());
  auto engine = Engine::create(config);
  REQUIRE(engine.ok());
  auto started = std::chrono::steady_clock::now();
  Request request{1, prompt, steps, {}, false};
  request.ignore_eos = true;
  auto tokens = (*engine)->submit(request)->wait();
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  REQUIRE(tokens.ok());
  CHECK(*tokens == (*expected)[0]);
  (*engine)->shutdown();
  auto report = (*engine)->report();
  INFO("timers " << report.retransmit_timers << " in " << seconds << " s, " << steps << " steps of "
                 << (*engine)->model_config().num_layers << " layers");
  CHECK(report.retransmit_timers >= 1);
  // The first timeout without a fault plan is 1 s: a timer fires and re-arms about once a second.
  CHECK(double(report.retransmit_timers) <= 2.0 * (1.0 + seconds));
}

TEST_CASE("bad requests end their stream with an error; cancel stops a request") {
  EngineConfig config;
  config.synthetic_config = small_model;
  config.kv_capacity_tokens = 100;
  auto engine = Engine::create(config);
  REQUIRE(engine.ok());
  auto error_of = [&](Request r) {
    auto out = (*engine)->submit(std::move(r))->wait();
    REQUIRE_FALSE(out.ok());
    return out.err().message;
  };
  CHECK(error_of({0, {}, 4, {}, false}).find("empty prompt") != std::string::npos);
  CHECK(error_of({0, {1, 211}, 4, {}, false}).find("token id 211") != std::string::npos);
  CHECK(error_of({0, {1}, 0, {}, false}).find("max_new_tokens") != std::string::npos);
  CHECK(error_of({0, std::vector<std::int32_t>(90, 1), 20, {}, false}).find("KV tokens") != std::string::npos);

  auto long_one = (*engine)->submit({42, {1, 2, 3}, 60, {}, false});
  CHECK(error_of({42, {1}, 2, {}, false}).find("already in use") != std::string::npos);
  (*engine)->cancel(42);
  auto out = long_one->wait();
  REQUIRE_FALSE(out.ok());
  CHECK(out.err().message == "cancelled");
  CHECK(long_one->finish_reason() == FinishReason::cancelled);
  CHECK(long_one->error_code() == ErrorCode::none);

  (*engine)->shutdown();
  CHECK(error_of({0, {1}, 2, {}, false}).find("shut down") != std::string::npos);
  auto bad = Engine::create(EngineConfig{});
  REQUIRE_FALSE(bad.ok());
}

TEST_CASE("a workload whose shape changes re-solves the plan online; tokens stay those of the reference") {
  std::ifstream in{test::source_dir() / "configs" / "testbeds" / "cpu.json"};
  std::string text{std::istreambuf_iterator<char>(in), {}};
  auto bed = policy::parse_testbed(text, "cpu.json");
  REQUIRE(bed.ok());
  EngineConfig config;
  config.synthetic_config = small_model;
  config.attention_devices = 2;
  config.expert_devices = 2;
  config.online_testbed = *bed;
  config.replan = {0.5, 1};
  auto ref = reference_for(config);
  auto engine = Engine::create(config);
  REQUIRE(engine.ok());

  rng gen{3};
  auto run_wave = [&](std::size_t count, std::size_t prompt_len, std::uint64_t first_id) {
    std::vector<Request> requests;
    std::vector<model::generation_request> ref_requests;
    for (std::size_t i = 0; i < count; ++i) {
      std::vector<std::int32_t> prompt(prompt_len);
      for (auto& t : prompt)
        t = std::int32_t(gen.next_u64() % 211);
      requests.push_back({first_id + i, prompt, 4, {0.7f, 0, 1.0f, 9}, false});
      ref_requests.push_back({first_id + i, prompt, 4, {0.7f, 0, 1.0f, 9}});
    }
    auto expected = model::generate(*ref, ref_requests, model::decode_mode::kv_cache);
    REQUIRE(expected.ok());
    std::vector<std::shared_ptr<TokenStream>> streams;
    for (const auto& r : requests)
      streams.push_back((*engine)->submit(r));
    for (std::size_t i = 0; i < count; ++i) {
      auto tokens = streams[i]->wait();
      REQUIRE(tokens.ok());
      CHECK(*tokens == (*expected)[i]);
    }
  };
  // The policy actor counts a re-solve when it reads a shard's shape report, which may come
  // after the wave's last token: wait for it (bounded) instead of racing it.
  auto replans_reaching = [&](std::uint64_t wanted) {
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds{5};
    while ((*engine)->report().replans < wanted && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::milliseconds{5});
    return (*engine)->report().replans;
  };
  run_wave(2, 4, 1);       // small batch, short context: the first plan
  auto after_first = replans_reaching(1);
  CHECK(after_first >= 1);
  run_wave(48, 60, 100);   // 24× the batch, 15× the context: a new plan
  replans_reaching(after_first + 1);
  auto report = (*engine)->report();
  CHECK(report.replans > after_first);
  CHECK(report.last_solve_micros > 0);
  (*engine)->shutdown();
}

TEST_CASE("deepseek_v2_tiny (MLA, dense layer, shared experts) through the actor path is bit-identical") {
  auto dir = test::fixture_dir("deepseek_v2_tiny");
  if (dir.empty())
    return;
  EngineConfig config;
  config.model_dir = dir.string();
  check_equivalence(config, fixture_prompts(dir), 8, 12);
}

TEST_CASE("the FinDEP view of a model keeps its shapes, GQA and MLA") {
  auto qwen = model::parse_config(small_model, "test");
  REQUIRE(qwen.ok());
  auto shape = Engine::shape_of(*qwen);
  CHECK(validate(shape).ok());
  CHECK(shape.num_dense_layers == 1);
  CHECK(shape.num_shared == 1);
  CHECK(policy::kv_bytes_per_token_per_layer(shape) == std::uint64_t(qwen->kv_bytes_per_token_per_layer()));
  auto dir = test::fixture_dir("deepseek_v2_tiny");
  if (dir.empty())
    return;
  auto deepseek = model::load_config(dir);
  REQUIRE(deepseek.ok());
  shape = Engine::shape_of(*deepseek);
  CHECK(validate(shape).ok());
  CHECK(shape.attention == policy::attention_kind::mla);
  CHECK(policy::kv_bytes_per_token_per_layer(shape) == std::uint64_t(deepseek->kv_bytes_per_token_per_layer()));
}
