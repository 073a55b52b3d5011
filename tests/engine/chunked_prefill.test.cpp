// Chunked prefill (issue [P] part 4): a prompt fed in chunks gives the tokens and logits of a
// whole-prompt prefill, bit for bit, and sequences decoding beside a long prompt keep getting
// a token every step instead of waiting for its whole prefill.
#include <catch2/catch.hpp>

#include "core/rng.hpp"
#include "engine/engine.hpp"
#include "test_support.hpp"
#include "model/forward.hpp"

#include <mutex>

using namespace moert;

namespace {

const std::string small_model = test::small_moe_model_with(R"("max_position_embeddings": 1024)");

struct run_output {
  std::vector<std::vector<std::int32_t>> tokens;
  std::vector<std::vector<std::vector<float>>> logits;
};

run_output run(const EngineConfig& config, const std::vector<Request>& requests) {
  auto engine = Engine::create(config);
  REQUIRE(engine.ok());
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (const Request& r : requests)
    streams.push_back((*engine)->submit(r));
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
  return out;
}

}  // namespace

TEST_CASE("chunked prefill gives the tokens and logits of whole prompts, over chunk sizes and placements") {
  rng gen{4};
  std::vector<Request> requests;
  std::vector<model::generation_request> ref_requests;
  for (std::size_t length : {1, 5, 13, 30, 64}) {
    std::vector<std::int32_t> prompt(length);
    for (auto& t : prompt)
      t = std::int32_t(gen.next_u64() % 211);
    model::sampling_params sampling;
    if (requests.size() % 2 == 1)
      sampling = {0.8f, 40, 0.95f, 77};
    requests.push_back({requests.size() + 1, prompt, 5, sampling, true});
    requests.back().ignore_eos = true;
    ref_requests.push_back({requests.back().id, prompt, 5, sampling});
  }
  auto parsed = model::parse_config(small_model, "test");
  REQUIRE(parsed.ok());
  model::reference_model ref{*parsed, model::synthetic_weights(*parsed, 5), 1};
  auto expected = model::generate(ref, ref_requests, model::decode_mode::kv_cache);
  REQUIRE(expected.ok());

  EngineConfig base;
  base.synthetic_config = small_model;
  base.weight_seed = 5;
  base.prefill_chunk_tokens = 0;
  auto whole = run(base, requests);
  CHECK(whole.tokens == *expected);
  for (std::size_t chunk : {1, 3, 7, 16}) {
    for (bool split : {false, true}) {
      INFO("chunk " << chunk << (split ? ", 2 + 2 devices, r1 2, AASS" : ", 1 + 1 devices"));
      EngineConfig config = base;
      config.prefill_chunk_tokens = chunk;
      if (split) {
        config.attention_devices = 2;
        config.expert_devices = 2;
        config.plan = {2, 0, 2, policy::segment_order::aass};
      }
      auto chunked = run(config, requests);
      CHECK(chunked.tokens == *expected);
      CHECK(chunked.logits == whole.logits);  // bit-identical, every step
    }
  }
}

TEST_CASE("a sequence decoding beside a long prompt gets a token every step of its chunked prefill") {
  auto tokens_before_long_prompt = [](std::size_t chunk) {
    EngineConfig config;
    config.synthetic_config = small_model;
    config.prefill_chunk_tokens = chunk;
    auto engine = Engine::create(config);
    REQUIRE(engine.ok());
    std::mutex mutex;
    std::size_t short_tokens = 0, short_tokens_at_long_first = 0;
    bool long_seen = false;
    Request decoding{1, {3, 1, 4, 1}, 200, {}, false};
    decoding.ignore_eos = true;
    auto first = (*engine)->submit(decoding, [&](const TokenEvent& e) {
      std::lock_guard lock{mutex};
      short_tokens += e.token >= 0;
    });
    // The long prompt comes once the short one decodes.
    for (int i = 0; i < 2000; ++i) {
      {
        std::lock_guard lock{mutex};
        if (short_tokens > 0)
          break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds{1});
    }
    Request prompt{2, std::vector<std::int32_t>(640, 7), 1, {}, false};
    prompt.ignore_eos = true;
    auto second = (*engine)->submit(prompt, [&](const TokenEvent& e) {
      std::lock_guard lock{mutex};
      if (e.token >= 0 && !long_seen) {
        long_seen = true;
        short_tokens_at_long_first = short_tokens;
      }
    });
    REQUIRE(first->wait().ok());
    REQUIRE(second->wait().ok());
    (*engine)->shutdown();
    std::lock_guard lock{mutex};
    return short_tokens_at_long_first;
  };
  // 640 tokens in chunks of 16 take 40 steps, each with a decode token of the short sequence;
  // whole, the long prompt is one step (the short one's tokens then are those of the few steps
  // the long one took to reach the shard).
  std::size_t chunked = tokens_before_long_prompt(16);
  std::size_t whole = tokens_before_long_prompt(0);
  INFO("short-sequence tokens when the long prompt's first token came: chunked " << chunked << ", whole " << whole);
  CHECK(chunked >= 40);
  CHECK(whole < 40);
}
