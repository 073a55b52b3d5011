#pragma once

// The shape of an MoE model as the FinDEP cost and memory models see it
// (../shared/reference/findep.md §3.1, §4.1, §9). Pure data, loaded from
// configs/models/shapes/*.json by testbed_json.hpp; counts are elements, sizes are bytes.

#include "core/error.hpp"

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moert::policy {

enum class attention_kind { gqa, mla };

std::string_view to_string(attention_kind kind);

// Grouped-query attention (MHA when num_kv_heads == num_heads).
struct gqa_shape {
  std::size_t num_heads = 0;
  std::size_t num_kv_heads = 0;
  std::size_t head_dim = 0;
};

// DeepSeek multi-head latent attention. q_lora_rank 0 means a direct q projection (V2-Lite).
struct mla_shape {
  std::size_t num_heads = 0;
  std::size_t q_lora_rank = 0;
  std::size_t kv_lora_rank = 0;
  std::size_t qk_nope_head_dim = 0;
  std::size_t qk_rope_head_dim = 0;
  std::size_t v_head_dim = 0;
};

struct model_shape {
  std::string name;
  std::size_t num_layers = 0;        // all decoder layers, dense ones included
  std::size_t num_dense_layers = 0;  // leading dense-FFN layers (DeepSeek first_k_dense_replace)
  std::size_t dense_intermediate = 0;
  std::size_t hidden = 0;               // M
  std::size_t num_experts = 0;          // E, routed
  std::size_t top_k = 0;
  std::size_t expert_intermediate = 0;  // H of one routed expert
  std::size_t num_shared = 0;           // N_shared
  std::size_t shared_intermediate = 0;  // H of one shared expert
  attention_kind attention = attention_kind::gqa;
  gqa_shape gqa;  // used when attention == gqa
  mla_shape mla;  // used when attention == mla
  std::size_t vocab = 0;
  std::size_t dtype_bytes = 2;

  std::size_t num_moe_layers() const { return num_layers - num_dense_layers; }
};

// Checks every field a formula divides by or multiplies with; the error names the field.
[[nodiscard]] status validate(const model_shape& shape);

// One weight matrix of the attention block: k inputs, n outputs, k·n MACs per token.
struct gemm_dims {
  std::size_t k = 0;
  std::size_t n = 0;
};

// The projections of one attention layer, one GEMM per weight (findep.md §4.1): GQA q, k, v, o;
// MLA q_a, q_b (or q), kv_a, kv_b, o.
std::vector<gemm_dims> attention_gemms(const model_shape& shape);

// Σ k·n over attention_gemms: parameters, and MACs per token.
std::uint64_t attention_params(const model_shape& shape);

// MACs of QKᵀ and PV per (query, key) pair: n_h·(d_k + d_v) (Eq. 1's attention core).
std::uint64_t attention_core_macs_per_pair(const model_shape& shape);

// Bytes of KV cache per token per layer: GQA 2·kv_heads·head_dim, MLA kv_lora + qk_rope,
// times dtype_bytes (findep.md §9: 1,152 B for DeepSeek-V2, 2,048 B for Qwen3-235B).
std::uint64_t kv_bytes_per_token_per_layer(const model_shape& shape);

}  // namespace moert::policy
