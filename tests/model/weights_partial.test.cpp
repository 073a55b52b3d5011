// A cluster node loads only its part of a checkpoint.
#include <catch2/catch.hpp>

#include "model/weights.hpp"
#include "test_support.hpp"

#include <cstring>

using namespace moert;

TEST_CASE("a node's part: the expert side holds only its experts, the attention side no routed expert") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty())
    test::skip_whole_binary("fixtures not found");
  auto whole = model::load_checkpoint(dir);
  REQUIRE(whole.ok());

  model::load_options experts_only;
  experts_only.attention_side = false;
  experts_only.keep_expert = [](std::size_t e) { return e % 2 == 1; };  // device 1 of 2
  auto expert_part = model::load_checkpoint(dir, experts_only);
  REQUIRE(expert_part.ok());
  CHECK(expert_part->weights.embedding.empty());
  CHECK(expert_part->weights.unexpected_tensors.empty());  // a part does not report the rest
  for (std::size_t l = 0; l < expert_part->weights.layers.size(); ++l) {
    const auto& layer = expert_part->weights.layers[l];
    CHECK(layer.attention.qkv.weight.num_bytes() == 0);
    CHECK(layer.router.num_bytes() == 0);
    for (std::size_t e = 0; e < layer.experts.size(); ++e) {
      INFO("layer " << l << " expert " << e);
      if (e % 2 == 1)
        CHECK(layer.experts[e].gate_up.num_bytes() == whole->weights.layers[l].experts[e].gate_up.num_bytes());
      else
        CHECK(layer.experts[e].gate_up.num_bytes() == 0);
    }
  }

  model::load_options attention_only;
  attention_only.keep_expert = [](std::size_t) { return false; };
  auto attention_part = model::load_checkpoint(dir, attention_only);
  REQUIRE(attention_part.ok());
  const auto& kept = attention_part->weights.embedding;
  REQUIRE(kept.num_bytes() == whole->weights.embedding.num_bytes());  // host memory: compare bytes
  CHECK(std::memcmp(kept.data(), whole->weights.embedding.data(), kept.num_bytes()) == 0);
  auto held = model::resident_bytes(attention_part->weights).total();
  CHECK(held < model::resident_bytes(whole->weights).total());
  for (const auto& layer : attention_part->weights.layers)
    for (const auto& expert : layer.experts)
      CHECK(expert.down.num_bytes() == 0);
}

TEST_CASE("standard attention holds q, k and v as one fused matrix of exactly their bytes") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty())
    test::skip_whole_binary("fixtures not found");
  auto loaded = model::load_checkpoint(dir);
  REQUIRE(loaded.ok());
  auto source = model::checkpoint::open(dir);
  REQUIRE(source.ok());
  const model::model_config& c = loaded->config;
  for (std::size_t l = 0; l < loaded->weights.layers.size(); ++l) {
    INFO("layer " << l);
    const auto& a = loaded->weights.layers[l].attention;
    CHECK(a.qkv.weight.rows() == std::size_t(c.q_dim() + 2 * c.kv_dim()));
    CHECK(a.qkv.weight.cols() == std::size_t(c.hidden_size));
    CHECK(a.q.weight.num_bytes() == 0);  // no separate copy of a part
    std::size_t stored = 0;
    for (const char* part : {"q_proj", "k_proj", "v_proj"}) {
      const auto* view = source->find("model.layers." + std::to_string(l) + ".self_attn." + part + ".weight");
      REQUIRE(view != nullptr);
      stored += view->num_elements * size_of(view->type);
    }
    CHECK(a.qkv.weight.num_bytes() == stored);
  }
}
