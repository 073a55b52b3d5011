#pragma once

// The model description moert computes with, read from a Hugging Face config.json.
//
// Every field that changes the math is read; fields that only matter for training or for
// features moert does not implement are checked so that a config asking for such a feature
// (sliding-window attention, rope scaling other than DeepSeek's YaRN, a non-SiLU activation)
// is refused with an error naming the key instead of being silently computed differently.

#include "core/dtype.hpp"
#include "core/error.hpp"

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace moert::model {

enum class architecture { qwen3_moe, qwen2_moe, mixtral, deepseek_v2 };

// How the router picks its top-k (DeepSeek's topk_method; the others are plain greedy).
enum class topk_method { greedy, group_limited_greedy };

// YaRN rope scaling as DeepSeek-V2 configures it (rope_scaling.type = "yarn").
struct yarn_scaling {
  double factor = 1.0;
  double original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
};

std::string_view to_string(architecture arch);

struct model_config {
  architecture arch = architecture::qwen3_moe;
  std::int64_t vocab_size = 0;
  std::int64_t hidden_size = 0;
  std::int64_t num_layers = 0;
  std::int64_t num_heads = 0;
  std::int64_t num_kv_heads = 0;
  std::int64_t head_dim = 0;  // MLA: qk_nope_head_dim + qk_rope_head_dim, the q/k head size
  double rope_theta = 10000.0;
  float rms_norm_eps = 1e-6f;
  std::int64_t max_position_embeddings = 0;

  // Routed experts.
  std::int64_t num_experts = 0;
  std::int64_t num_experts_per_tok = 0;
  std::int64_t moe_intermediate_size = 0;
  // Renormalise the top-k routing weights to sum to 1 (always true for Mixtral).
  bool norm_topk_prob = false;
  // Dense MLP size for layers that are not sparse (0 when every layer is sparse).
  std::int64_t intermediate_size = 0;
  // Shared expert (qwen2_moe; DeepSeek's n_shared_experts fused into one MLP); 0 = none.
  std::int64_t shared_expert_intermediate_size = 0;
  // qwen2_moe scales the shared expert by sigmoid(shared_expert_gate(x)); DeepSeek adds it as is.
  bool shared_expert_gated = false;
  // Router top-k selection. group_limited_greedy: only experts of the topk_group groups (of
  // n_group contiguous groups) with the highest maximum probability are eligible.
  topk_method topk = topk_method::greedy;
  std::int64_t n_group = 1;
  std::int64_t topk_group = 1;
  // Routing weights are multiplied by this after the (optional) renormalisation.
  float routed_scaling_factor = 1.0f;
  // Per layer: true = MoE block, false = dense MLP (decoder_sparse_step / mlp_only_layers).
  std::vector<bool> sparse_layers;

  bool qkv_bias = false;    // bias on q_proj, k_proj, v_proj
  bool o_bias = false;      // bias on o_proj
  bool qk_norm = false;     // per-head RMSNorm of q and k before RoPE (qwen3)
  bool tie_word_embeddings = false;
  // config.json eos_token_id (an int or a list; may be absent): generation stops after one.
  std::vector<std::int32_t> eos_token_ids;
  dtype torch_dtype = dtype::f32;  // the declared storage type; compute is f32

  // Multi-head latent attention (deepseek_v2). q_lora_rank 0 = plain q_proj.
  std::int64_t q_lora_rank = 0;
  std::int64_t kv_lora_rank = 0;
  std::int64_t qk_nope_head_dim = 0;
  std::int64_t qk_rope_head_dim = 0;
  std::int64_t v_head_dim = 0;
  bool has_yarn = false;
  yarn_scaling yarn;

  bool mla() const { return arch == architecture::deepseek_v2; }
  std::int64_t q_dim() const { return num_heads * head_dim; }
  std::int64_t kv_dim() const { return num_kv_heads * head_dim; }
  // Width RoPE rotates: the whole head, or only the rope part of an MLA head.
  std::int64_t rope_dim() const { return mla() ? qk_rope_head_dim : head_dim; }
  // Floats cached per token and layer: K and V (kv_dim each), or for MLA one compressed row,
  // the normalised kv latent (kv_lora_rank) followed by the roped k_pe (qk_rope_head_dim).
  std::int64_t kv_floats_per_token_per_layer() const {
    return mla() ? kv_lora_rank + qk_rope_head_dim : 2 * kv_dim();
  }
  // Bytes of KV cache per token and layer, in f32.
  std::int64_t kv_bytes_per_token_per_layer() const { return kv_floats_per_token_per_layer() * 4; }
};

// Parses config.json text. `source` names the file in error messages.
result<model_config> parse_config(std::string_view json_text, const std::string& source);

// Reads <dir>/config.json.
result<model_config> load_config(const std::filesystem::path& dir);

// Parameter count and f32 bytes of each part of the model, for `moert inspect`.
struct parameter_breakdown {
  std::int64_t embedding = 0;
  std::int64_t attention = 0;
  std::int64_t norms = 0;
  std::int64_t router = 0;
  std::int64_t routed_experts = 0;
  std::int64_t shared_experts = 0;  // shared expert and its gate
  std::int64_t dense_mlp = 0;
  std::int64_t lm_head = 0;  // 0 when tied to the embedding
  std::int64_t total() const {
    return embedding + attention + norms + router + routed_experts + shared_experts +
           dense_mlp + lm_head;
  }
  // Parameters touched per token: everything but the routed experts not chosen.
  std::int64_t active_per_token(const model_config& config) const;
};

parameter_breakdown count_parameters(const model_config& config);

}  // namespace moert::model
