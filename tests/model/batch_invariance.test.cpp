// DESIGN.md §4: a prompt's logits are the same bits alone, inside a batch with others and with
// 1 or 2 threads; its tokens are the same whether decoded from the KV cache, recomputed from
// scratch, or sampled next to different neighbours.
#include <catch2/catch.hpp>

#include "core/rng.hpp"
#include "model/forward.hpp"
#include "test_support.hpp"

using namespace moert;
using namespace moert::model;

namespace {

model_config small_config(const std::string& type) {
  std::string json = R"({"model_type": ")" + type + R"(", "vocab_size": 97, "hidden_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
    "num_experts": 6, "num_local_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 20,
    "intermediate_size": 40, "shared_expert_intermediate_size": 24, "norm_topk_prob": true,
    "mlp_only_layers": [1]})";
  if (type == "mixtral")
    json = R"({"model_type": "mixtral", "vocab_size": 97, "hidden_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_local_experts": 6, "num_experts_per_tok": 2, "intermediate_size": 20})";
  auto config = parse_config(json, "test");
  REQUIRE(config.ok());
  return *config;
}

std::vector<std::vector<std::int32_t>> random_prompts(std::int64_t vocab) {
  rng gen{7};
  std::vector<std::vector<std::int32_t>> prompts;
  for (std::size_t len : {5u, 1u, 12u, 3u}) {
    std::vector<std::int32_t> p(len);
    for (auto& id : p)
      id = std::int32_t(gen.next_u64() % std::uint64_t(vocab));
    prompts.push_back(p);
  }
  return prompts;
}

std::vector<float> run(reference_model& m, const std::vector<std::vector<std::int32_t>>& prompts) {
  std::vector<kv_cache> caches(prompts.size(), kv_cache{m.config()});
  std::vector<forward_segment> segments;
  for (std::size_t i = 0; i < prompts.size(); ++i)
    segments.push_back({&caches[i], prompts[i]});
  auto logits = m.forward(segments, logits_for::every_token);
  REQUIRE(logits.ok());
  return logits.value();
}

}  // namespace

TEST_CASE("logits are bit-identical alone, batched and across thread counts") {
  for (std::string type : {"qwen3_moe", "qwen2_moe", "mixtral"}) {
    INFO(type);
    auto config = small_config(type);
    reference_model one_thread{config, synthetic_weights(config, 3), 1};
    reference_model two_threads{config, synthetic_weights(config, 3), 2};
    auto prompts = random_prompts(config.vocab_size);
    std::size_t vocab = std::size_t(config.vocab_size);

    auto batched = run(one_thread, prompts);
    CHECK(run(two_threads, prompts) == batched);
    std::size_t row = 0;
    for (const auto& prompt : prompts) {
      auto alone = run(two_threads, {prompt});
      std::vector<float> slice(batched.begin() + std::ptrdiff_t(row * vocab),
                               batched.begin() + std::ptrdiff_t((row + prompt.size()) * vocab));
      CHECK(alone == slice);
      row += prompt.size();
    }
  }
}

TEST_CASE("a sequence decoded next to different neighbours produces the same bits") {
  auto config = small_config("qwen3_moe");
  reference_model m{config, synthetic_weights(config, 11), 2};
  auto prompts = random_prompts(config.vocab_size);
  sampling_params sampled{0.9f, 20, 0.95f, 1234};
  std::vector<generation_request> all;
  for (std::size_t i = 0; i < prompts.size(); ++i)
    all.push_back({i, prompts[i], 6, sampled});
  auto together = generate(m, all, decode_mode::kv_cache);
  REQUIRE(together.ok());
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    auto alone = generate(m, std::span{&all[i], 1}, decode_mode::kv_cache);
    REQUIRE(alone.ok());
    CHECK((*alone)[0] == (*together)[i]);
    auto recomputed = generate(m, std::span{&all[i], 1}, decode_mode::full_recompute);
    REQUIRE(recomputed.ok());
    CHECK((*recomputed)[0] == (*together)[i]);
  }
}

TEST_CASE("bad token ids and empty prompts are refused without touching the caches") {
  auto config = small_config("qwen3_moe");
  reference_model m{config, synthetic_weights(config, 3), 1};
  kv_cache good{config}, bad{config};
  std::vector<std::int32_t> ok_tokens{1, 2, 3}, bad_tokens{4, 97};
  std::vector<forward_segment> segments{{&good, ok_tokens}, {&bad, bad_tokens}};
  auto out = m.forward(segments, logits_for::last_token);
  REQUIRE_FALSE(out.ok());
  CHECK(out.err().message.find("token id 97") != std::string::npos);
  CHECK(good.length() == 0);
  CHECK(bad.length() == 0);

  std::vector<generation_request> empty{{0, {}, 4, {}}};
  auto gen = generate(m, empty, decode_mode::kv_cache);
  REQUIRE_FALSE(gen.ok());
  CHECK(gen.err().message.find("empty prompt") != std::string::npos);
}
