// DESIGN.md §4: a prompt's logits are the same bits alone, inside a batch with others and with
// 1 or 2 threads; its tokens are the same whether decoded from the KV cache, recomputed from
// scratch, or sampled next to different neighbours.
#include <catch2/catch.hpp>

#include "core/rng.hpp"
#include "gpu/cpu/backend.hpp"
#include "gpu/cpu/gemm.hpp"
#include "gpu/cpu/ops.hpp"
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
  if (type == "deepseek_v2")  // q_lora, group-limited routing, YaRN, dense layer 0, shared experts
    json = R"({"model_type": "deepseek_v2", "vocab_size": 97, "hidden_size": 48,
    "num_hidden_layers": 2, "num_attention_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 16,
    "qk_nope_head_dim": 12, "qk_rope_head_dim": 6, "v_head_dim": 10, "n_routed_experts": 8,
    "n_shared_experts": 2, "num_experts_per_tok": 3, "moe_intermediate_size": 12, "intermediate_size": 40,
    "first_k_dense_replace": 1, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
    "routed_scaling_factor": 2.5, "rope_scaling": {"type": "yarn", "factor": 8,
    "original_max_position_embeddings": 8, "beta_fast": 32, "beta_slow": 1, "mscale": 0.8,
    "mscale_all_dim": 0.5}})";
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
  for (std::string type : {"qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2"}) {
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
  for (std::string type : {"qwen3_moe", "deepseek_v2"}) {
    INFO(type);
    auto config = small_config(type);
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

TEST_CASE("group-limited routing picks only from the best groups and scales the weights") {
  auto config = small_config("deepseek_v2");  // 8 experts in 4 groups, 2 groups kept, top-3, × 2.5
  auto weights = synthetic_weights(config, 5);
  std::size_t hidden = std::size_t(config.hidden_size), rows = 64, top_k = 3, layer = 1;
  rng gen{9};
  std::vector<float> x(rows * hidden), normed(rows * hidden), logits(rows * 8);
  for (auto& v : x)
    v = gen.uniform(-2.0f, 2.0f);
  std::vector<routed_slot> routes(rows * top_k);
  route_step(config, weights, layer, x.data(), rows, normed.data(), routes.data(), gpu::host_backend());
  cpu::matmul(normed.data(), rows, cpu::packed_of(weights.layers[layer].router), logits.data(), nullptr);
  std::size_t differs_from_greedy = 0;
  for (std::size_t t = 0; t < rows; ++t) {
    float* p = logits.data() + t * 8;
    cpu::softmax(p, 8);
    std::vector<std::size_t> groups{0, 1, 2, 3};
    auto group_max = [&](std::size_t g) { return std::max(p[2 * g], p[2 * g + 1]); };
    std::sort(groups.begin(), groups.end(),
              [&](std::size_t a, std::size_t b) { return group_max(a) > group_max(b); });
    std::vector<std::size_t> eligible{2 * groups[0], 2 * groups[0] + 1, 2 * groups[1], 2 * groups[1] + 1};
    std::sort(eligible.begin(), eligible.end(), [&](std::size_t a, std::size_t b) { return p[a] > p[b]; });
    std::vector<std::size_t> all{0, 1, 2, 3, 4, 5, 6, 7};
    std::sort(all.begin(), all.end(), [&](std::size_t a, std::size_t b) { return p[a] > p[b]; });
    std::vector<std::size_t> want(eligible.begin(), eligible.begin() + 3);
    std::vector<std::size_t> greedy(all.begin(), all.begin() + 3);
    std::sort(want.begin(), want.end());
    std::sort(greedy.begin(), greedy.end());
    differs_from_greedy += want != greedy;
    for (std::size_t s = 0; s < top_k; ++s) {
      const routed_slot& r = routes[t * top_k + s];
      CHECK(std::size_t(r.expert) == want[s]);  // in expert-index order
      CHECK(r.weight == p[r.expert] * 2.5f);    // not renormalised
    }
  }
  CHECK(differs_from_greedy > 0);  // the groups did constrain some rows
}

TEST_CASE("logits are bit-identical across thread counts when experts spread over lanes by work") {
  // Large enough that the MoE block passes the spread threshold (the small configs above run
  // inline), with prompts long enough that experts get very different row counts.
  auto config = parse_config(R"({"model_type": "qwen3_moe", "vocab_size": 97, "hidden_size": 256,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "norm_topk_prob": true})",
                             "test");
  REQUIRE(config.ok());
  reference_model one_thread{*config, synthetic_weights(*config, 5), 1};
  reference_model two_threads{*config, synthetic_weights(*config, 5), 2};
  reference_model three_threads{*config, synthetic_weights(*config, 5), 3};
  rng gen{11};
  std::vector<std::vector<std::int32_t>> prompts(3, std::vector<std::int32_t>(40));
  for (auto& p : prompts)
    for (auto& id : p)
      id = std::int32_t(gen.next_u64() % 97);
  auto want = run(one_thread, prompts);
  CHECK(run(two_threads, prompts) == want);
  CHECK(run(three_threads, prompts) == want);
}
