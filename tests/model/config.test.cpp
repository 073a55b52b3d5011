#include <catch2/catch.hpp>

#include "model/config.hpp"
#include "test_support.hpp"

using namespace moert;
using namespace moert::model;

namespace {

const char* qwen3 = R"({"model_type": "qwen3_moe", "vocab_size": 384, "hidden_size": 64,
  "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
  "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "intermediate_size": 256,
  "norm_topk_prob": true, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06})";

std::string with(const std::string& base, const std::string& extra) {
  return base.substr(0, base.size() - 1) + ", " + extra + "}";
}

std::string error_of(const std::string& json) {
  auto config = parse_config(json, "config.json");
  REQUIRE_FALSE(config.ok());
  return config.err().message;
}

}  // namespace

TEST_CASE("qwen3_moe fields are read with Hugging Face defaults") {
  auto c = parse_config(qwen3, "config.json");
  REQUIRE(c.ok());
  CHECK(c->arch == architecture::qwen3_moe);
  CHECK(c->head_dim == 24);
  CHECK(c->qk_norm);
  CHECK_FALSE(c->qkv_bias);
  CHECK(c->norm_topk_prob);
  CHECK(c->rope_theta == 1e6);
  CHECK(c->sparse_layers == std::vector<bool>{true, true, true, true});
  CHECK(c->kv_bytes_per_token_per_layer() == 2 * 2 * 24 * 4);

  auto defaults = parse_config(R"({"model_type": "qwen3_moe", "vocab_size": 10, "hidden_size": 64,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_experts": 4, "num_experts_per_tok": 1,
    "moe_intermediate_size": 8})", "c");
  REQUIRE(defaults.ok());
  CHECK(defaults->head_dim == 16);  // hidden / heads
  CHECK(defaults->num_kv_heads == 4);
  CHECK_FALSE(defaults->norm_topk_prob);
}

TEST_CASE("dense layers follow decoder_sparse_step and mlp_only_layers") {
  auto c = parse_config(with(qwen3, R"("decoder_sparse_step": 2, "mlp_only_layers": [3])"), "c");
  REQUIRE(c.ok());
  CHECK(c->sparse_layers == std::vector<bool>{false, true, false, false});
  CHECK(c->intermediate_size == 256);
  CHECK(error_of(with(qwen3, R"("mlp_only_layers": [7])")).find("mlp_only_layers") != std::string::npos);
}

TEST_CASE("qwen2_moe has a gated shared expert and q/k/v bias") {
  std::string json = R"({"model_type": "qwen2_moe", "vocab_size": 100, "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 4,
    "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 64})";
  auto c = parse_config(json, "c");
  REQUIRE(c.ok());
  CHECK(c->shared_expert_intermediate_size == 64);
  CHECK(c->qkv_bias);
  CHECK_FALSE(c->o_bias);
  CHECK_FALSE(c->qk_norm);
  CHECK(c->head_dim == 8);
  auto missing = std::string{json};
  missing.replace(missing.find(", \"shared_expert_intermediate_size\": 64"), 38, "");
  CHECK(error_of(missing).find("shared_expert_intermediate_size") != std::string::npos);
}

TEST_CASE("mixtral always renormalises and reads num_local_experts") {
  auto c = parse_config(R"({"model_type": "mixtral", "vocab_size": 448, "hidden_size": 80,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 20,
    "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96, "sliding_window": null})", "c");
  REQUIRE(c.ok());
  CHECK(c->norm_topk_prob);
  CHECK(c->num_experts == 4);
  CHECK(c->moe_intermediate_size == 96);
  CHECK(c->rope_theta == 1e6);
}

TEST_CASE("unsupported features and bad fields are named in the error") {
  CHECK(error_of("{not json").find("not valid JSON") != std::string::npos);
  CHECK(error_of("[1, 2]").find("JSON object") != std::string::npos);
  CHECK(error_of(R"({"vocab_size": 3})").find("model_type") != std::string::npos);
  CHECK(error_of(R"({"model_type": "llama"})").find("'llama' is not supported") != std::string::npos);
  CHECK(error_of(with(qwen3, R"("rope_scaling": {"type": "yarn", "factor": 4})")).find("rope_scaling") !=
        std::string::npos);
  CHECK(error_of(with(qwen3, R"("use_sliding_window": true)")).find("sliding") != std::string::npos);
  CHECK(error_of(with(qwen3, R"("hidden_act": "gelu")")).find("hidden_act") != std::string::npos);
  CHECK(error_of(with(qwen3, R"("torch_dtype": "int8")")).find("torch_dtype") != std::string::npos);
  CHECK(error_of(with(qwen3, R"("norm_topk_prob": "yes")")).find("norm_topk_prob") != std::string::npos);
  std::string no_hidden = qwen3;
  no_hidden.replace(no_hidden.find("\"hidden_size\": 64,"), 18, "");
  CHECK(error_of(no_hidden).find("'hidden_size'") != std::string::npos);
  std::string negative = qwen3;
  negative.replace(negative.find("\"vocab_size\": 384"), 17, "\"vocab_size\": -5");
  CHECK(error_of(negative).find("vocab_size") != std::string::npos);
  std::string too_many = qwen3;
  too_many.replace(too_many.find("\"num_experts_per_tok\": 2"), 24, "\"num_experts_per_tok\": 9");
  CHECK(error_of(too_many).find("num_experts_per_tok") != std::string::npos);
  std::string gqa = qwen3;
  gqa.replace(gqa.find("\"num_key_value_heads\": 2"), 24, "\"num_key_value_heads\": 3");
  CHECK(error_of(gqa).find("num_key_value_heads") != std::string::npos);
  CHECK(error_of(R"({"model_type": "mixtral", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_local_experts": 2, "num_experts_per_tok": 1, "intermediate_size": 4,
    "sliding_window": 4096})").find("sliding_window") != std::string::npos);
}

TEST_CASE("load_config names a missing directory") {
  auto c = load_config("/nonexistent/model");
  REQUIRE_FALSE(c.ok());
  CHECK(c.err().message.find("/nonexistent/model") != std::string::npos);
}

TEST_CASE("parameter count adds up per component") {
  auto c = parse_config(qwen3, "c");
  REQUIRE(c.ok());
  auto p = count_parameters(*c);
  CHECK(p.embedding == 384 * 64);
  CHECK(p.lm_head == 384 * 64);
  CHECK(p.routed_experts == 4 * 8 * 3 * 64 * 32);
  CHECK(p.router == 4 * 8 * 64);
  CHECK(p.attention == 4 * (64 * 96 + 2 * 64 * 48 + 96 * 64));
  CHECK(p.active_per_token(*c) == p.total() - p.routed_experts + 4 * 2 * 3 * 64 * 32);
}
