// The Hugging Face fixtures of ../shared/fixtures against the reference forward: last-position
// logits within tolerance, argmax where the margin is clear, greedy continuations identical,
// through a batched prefill, token-by-token KV-cache decode and full recompute.
#include <catch2/catch.hpp>

#include "model/forward.hpp"
#include "test_support.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>

using namespace moert;
using namespace moert::model;

namespace {

nlohmann::json read_json(const std::filesystem::path& path) {
  std::ifstream in{path};
  return nlohmann::json::parse(in);
}

std::unique_ptr<reference_model> load(const std::filesystem::path& dir, std::size_t threads) {
  auto loaded = load_checkpoint(dir);
  REQUIRE(loaded.ok());
  CHECK(loaded->weights.unexpected_tensors.empty());
  return std::make_unique<reference_model>(std::move(loaded->config), std::move(loaded->weights), threads);
}

float max_abs_diff(const float* a, const nlohmann::json& b) {
  float worst = 0.0f;
  for (std::size_t i = 0; i < b.size(); ++i)
    worst = std::max(worst, std::fabs(a[i] - b[i].get<float>()));
  return worst;
}

void check_fixture(const std::string& name) {
  auto dir = test::fixture_dir(name);
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures/" + name + " not found");
    return;
  }
  auto prompts = read_json(dir / "prompts.json").get<std::vector<std::vector<std::int32_t>>>();
  auto expected = read_json(dir / "expected.json");
  float tol = expected["tolerance"]["last_logits_max_abs"].get<float>();
  auto model = load(dir, 2);
  std::size_t vocab = std::size_t(model->config().vocab_size);

  SECTION("batched prefill: last logits and argmax at every position") {
    std::vector<kv_cache> caches(prompts.size(), kv_cache{model->config()});
    std::vector<forward_segment> segments;
    for (std::size_t i = 0; i < prompts.size(); ++i)
      segments.push_back({&caches[i], prompts[i]});
    auto logits = model->forward(segments, logits_for::every_token);
    REQUIRE(logits.ok());
    std::size_t row = 0;
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      const auto& want = expected["prompts"][i];
      for (std::size_t j = 0; j < prompts[i].size(); ++j, ++row) {
        if (want["argmax_margin"][j].get<float>() >= 2 * tol)
          CHECK(argmax({logits->data() + row * vocab, vocab}) == want["argmax"][j].get<int>());
      }
      float diff = max_abs_diff(logits->data() + (row - 1) * vocab, want["last_logits"]);
      INFO(name << " prompt " << i << " last-logit max abs diff " << diff);
      CHECK(diff <= tol);
    }
  }

  SECTION("token-by-token KV-cache decode reaches the same last logits") {
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      kv_cache cache{model->config()};
      std::vector<float> last;
      for (std::int32_t token : prompts[i]) {
        std::vector<forward_segment> one{{&cache, std::span<const std::int32_t>{&token, 1}}};
        auto logits = model->forward(one, logits_for::last_token);
        REQUIRE(logits.ok());
        last = std::move(logits.value());
      }
      float diff = max_abs_diff(last.data(), expected["prompts"][i]["last_logits"]);
      INFO(name << " prompt " << i << " decode last-logit diff " << diff);
      CHECK(diff <= tol);
    }
  }

  SECTION("greedy continuation, KV cache and full recompute") {
    std::vector<generation_request> requests;
    for (std::size_t i = 0; i < prompts.size(); ++i)
      requests.push_back({i, prompts[i], expected["greedy_steps"].get<std::size_t>(), {}});
    for (auto mode : {decode_mode::kv_cache, decode_mode::full_recompute}) {
      auto out = generate(*model, requests, mode);
      REQUIRE(out.ok());
      for (std::size_t i = 0; i < prompts.size(); ++i) {
        INFO(name << " prompt " << i << (mode == decode_mode::kv_cache ? " kv cache" : " recompute"));
        CHECK((*out)[i] == expected["prompts"][i]["greedy"].get<std::vector<std::int32_t>>());
      }
    }
  }
}

}  // namespace

TEST_CASE("qwen3_moe_tiny matches the independent implementation") {
  check_fixture("qwen3_moe_tiny");
}

TEST_CASE("mixtral_tiny matches the independent implementation") {
  check_fixture("mixtral_tiny");
}

TEST_CASE("deepseek_v2_tiny matches the independent implementation") {
  check_fixture("deepseek_v2_tiny");
}

TEST_CASE("deepseek_v2 keeps the compressed MLA row in its KV cache") {
  auto dir = test::fixture_dir("deepseek_v2_tiny");
  if (dir.empty())
    return;
  auto model = load(dir, 1);
  const model_config& c = model->config();
  // kv_lora_rank 32 + qk_rope_head_dim 8 floats, not 2 × 4 heads × (16 + 16) expanded.
  CHECK(c.kv_bytes_per_token_per_layer() == (32 + 8) * 4);
  kv_cache cache{c};
  CHECK(cache.bytes_per_token_per_layer() == (32 + 8) * sizeof(float));
  std::vector<std::int32_t> tokens{1, 2, 3, 4, 5};
  std::vector<forward_segment> segments{{&cache, tokens}};
  REQUIRE(model->forward(segments, logits_for::last_token).ok());
  CHECK(cache.num_bytes() == 5 * std::size_t(c.num_layers) * (32 + 8) * sizeof(float));
  CHECK(cache.values(0) == nullptr);
}
