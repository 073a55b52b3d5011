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

namespace {

const char* deepseek_base = R"({"model_type": "deepseek_v2", "vocab_size": 320, "hidden_size": 64,
  "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": null,
  "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
  "n_routed_experts": 8, "n_shared_experts": 2, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
  "intermediate_size": 128, "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": false,
  "topk_method": "greedy", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
  "scoring_func": "softmax", "rope_theta": 10000.0})";
const char* yarn = R"("rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64,
  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707})";

// `json` with the scalar field `key` removed (empty value) or set to `value`.
std::string set(std::string json, const std::string& key, const std::string& value) {
  std::size_t at = json.find("\"" + key + "\": ");
  REQUIRE(at != std::string::npos);
  std::size_t value_at = at + key.size() + 4;
  std::size_t end = json.find_first_of(",}", value_at);
  if (value.empty())
    json.erase(at, json[end] == ',' ? end + 2 - at : end - at);
  else
    json.replace(value_at, end - value_at, value);
  return json;
}

}  // namespace

TEST_CASE("deepseek_v2 fields are read with DeepSeek's semantics") {
  auto c = parse_config(with(deepseek_base, yarn), "config.json");
  REQUIRE(c.ok());
  CHECK(c->arch == architecture::deepseek_v2);
  CHECK(c->mla());
  CHECK(c->q_lora_rank == 0);
  CHECK(c->kv_lora_rank == 32);
  CHECK(c->head_dim == 24);  // qk_nope + qk_rope
  CHECK(c->rope_dim() == 8);
  CHECK(c->v_head_dim == 16);
  CHECK(c->num_experts == 8);
  CHECK(c->shared_expert_intermediate_size == 2 * 32);
  CHECK_FALSE(c->shared_expert_gated);
  CHECK(c->sparse_layers == std::vector<bool>{false, true, true});
  CHECK(c->intermediate_size == 128);
  CHECK(c->topk == topk_method::greedy);
  CHECK(c->routed_scaling_factor == 1.0f);
  REQUIRE(c->has_yarn);
  CHECK(c->yarn.factor == 4.0);
  CHECK(c->yarn.original_max_position_embeddings == 64.0);
  CHECK(c->yarn.beta_fast == 32.0);
  CHECK(c->yarn.mscale_all_dim == 0.707);
  // The compressed row: kv_lora_rank + qk_rope_head_dim f32 values per token and layer.
  CHECK(c->kv_bytes_per_token_per_layer() == (32 + 8) * 4);
  auto p = count_parameters(*c);
  CHECK(p.attention == 3 * (64 * 96 + 64 * (32 + 8) + 32 * 4 * (16 + 16) + 4 * 16 * 64));
  CHECK(p.shared_experts == 2 * 3 * 64 * 64);  // ungated
  CHECK(p.dense_mlp == 3 * 64 * 128);

  std::string v2 = set(deepseek_base, "topk_method", R"("group_limited_greedy")");
  for (auto [key, value] : {std::pair{"n_group", "4"}, {"topk_group", "2"}, {"q_lora_rank", "48"},
                            {"routed_scaling_factor", "16.0"}})
    v2 = set(v2, key, value);
  auto g = parse_config(set(v2, "first_k_dense_replace", "0"), "c");
  REQUIRE(g.ok());
  CHECK(g->topk == topk_method::group_limited_greedy);
  CHECK(g->n_group == 4);
  CHECK(g->topk_group == 2);
  CHECK(g->q_lora_rank == 48);
  CHECK(g->routed_scaling_factor == 16.0f);
  CHECK(g->sparse_layers == std::vector<bool>{true, true, true});
  CHECK_FALSE(g->has_yarn);

  // Defaults: no shared experts, no dense layers, greedy, YaRN's own defaults.
  std::string minimal = R"({"model_type": "deepseek_v2", "vocab_size": 10, "hidden_size": 16,
    "num_hidden_layers": 1, "num_attention_heads": 2, "kv_lora_rank": 8, "qk_nope_head_dim": 4,
    "qk_rope_head_dim": 2, "v_head_dim": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 8, "rope_scaling": {"rope_type": "yarn", "factor": 40}})";
  auto d = parse_config(minimal, "c");
  REQUIRE(d.ok());
  CHECK(d->shared_expert_intermediate_size == 0);
  CHECK(d->sparse_layers == std::vector<bool>{true});
  CHECK(d->topk == topk_method::greedy);
  CHECK(d->yarn.original_max_position_embeddings == 4096.0);
  CHECK(d->yarn.beta_fast == 32.0);
  CHECK(d->yarn.beta_slow == 1.0);
  CHECK(d->yarn.mscale == 1.0);
  CHECK(d->yarn.mscale_all_dim == 0.0);
}

TEST_CASE("malformed or ambiguous deepseek_v2 configs are refused naming the field") {
  auto fails_with = [](const std::string& json, const std::string& what) {
    INFO(json);
    CHECK(error_of(json).find(what) != std::string::npos);
  };
  std::string ds = with(deepseek_base, yarn);
  std::string grouped = set(set(ds, "topk_method", R"("group_limited_greedy")"), "n_group", "4");
  fails_with(set(grouped, "topk_group", "5"), "topk_group (5) exceeds n_group (4)");
  fails_with(set(ds, "topk_group", "2"), "topk_group");
  fails_with(set(grouped, "n_group", ""), "'n_group'");
  fails_with(set(grouped, "n_group", "3"), "multiple of n_group");
  fails_with(set(set(grouped, "topk_group", "1"), "num_experts_per_tok", "3"), "num_experts_per_tok");
  fails_with(set(ds, "kv_lora_rank", ""), "missing required field 'kv_lora_rank'");
  fails_with(set(ds, "qk_rope_head_dim", ""), "'qk_rope_head_dim'");
  fails_with(set(ds, "qk_rope_head_dim", "7"), "qk_rope_head_dim (7) must be even");
  fails_with(set(ds, "v_head_dim", "0"), "v_head_dim");
  fails_with(set(ds, "n_routed_experts", ""), "n_routed_experts");
  fails_with(set(ds, "topk_method", R"("noaux_tc")"), "topk_method 'noaux_tc' is not supported");
  fails_with(set(ds, "norm_topk_prob", "true"), "norm_topk_prob = true is not supported");
  fails_with(set(ds, "moe_layer_freq", "2"), "moe_layer_freq = 2 is not supported");
  fails_with(set(ds, "scoring_func", R"("sigmoid")"), "scoring_func 'sigmoid'");
  fails_with(set(ds, "first_k_dense_replace", "-1"), "first_k_dense_replace");
  fails_with(set(ds, "intermediate_size", ""), "'intermediate_size'");
  fails_with(with(deepseek_base, R"("rope_scaling": {"type": "linear", "factor": 2})"), "'linear'");
  fails_with(with(deepseek_base, R"("rope_scaling": {"type": "yarn"})"),
             "rope_scaling: missing required field 'factor'");
  fails_with(with(deepseek_base, R"("rope_scaling": {"type": "yarn", "factor": 4, "beta_fast": 0})"),
             "beta_fast");
  fails_with(with(deepseek_base, R"("attention_bias": true)"), "attention_bias");
}

TEST_CASE("the published DeepSeek-V2 config loads, with a 576-value compressed cache row") {
  auto c = parse_config(R"({"architectures": ["DeepseekV2ForCausalLM"], "attention_bias": false,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "ep_size": 1,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 12288, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v2", "moe_intermediate_size": 1536, "moe_layer_freq": 1, "n_group": 8,
    "n_routed_experts": 160, "n_shared_experts": 2, "norm_topk_prob": false, "num_attention_heads": 128,
    "num_experts_per_tok": 6, "num_hidden_layers": 60, "num_key_value_heads": 128, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
    "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 16.0, "scoring_func": "softmax", "seq_aux": true,
    "tie_word_embeddings": false, "topk_group": 3, "topk_method": "group_limited_greedy",
    "torch_dtype": "bfloat16", "use_cache": true, "v_head_dim": 128, "vocab_size": 102400})", "c");
  REQUIRE(c.ok());
  CHECK(c->kv_floats_per_token_per_layer() == 576);
  CHECK(c->kv_bytes_per_token_per_layer() == 576 * 4);
  CHECK(c->topk == topk_method::group_limited_greedy);
  CHECK(c->shared_expert_intermediate_size == 2 * 1536);
}
