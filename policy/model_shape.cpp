#include "policy/model_shape.hpp"

namespace moert::policy {

std::string_view to_string(attention_kind kind) {
  return kind == attention_kind::mla ? "mla" : "gqa";
}

status validate(const model_shape& s) {
  auto bad = [&](const char* field) {
    return make_error(error_code::invalid_config,
                      "model shape '" + s.name + "': '" + field + "' must be positive");
  };
  if (s.num_layers == 0)
    return bad("num_layers");
  if (s.num_dense_layers >= s.num_layers)
    return make_error(error_code::invalid_config,
                      "model shape '" + s.name + "': 'num_dense_layers' must be below 'num_layers'");
  if (s.hidden == 0)
    return bad("hidden");
  if (s.num_experts == 0)
    return bad("num_experts");
  if (s.top_k == 0 || s.top_k > s.num_experts)
    return make_error(error_code::invalid_config,
                      "model shape '" + s.name + "': 'top_k' must be in 1..num_experts");
  if (s.expert_intermediate == 0)
    return bad("expert_intermediate");
  if (s.num_shared > 0 && s.shared_intermediate == 0)
    return bad("shared_intermediate");
  if (s.dtype_bytes == 0)
    return bad("dtype_bytes");
  if (s.attention == attention_kind::gqa) {
    if (s.gqa.num_heads == 0)
      return bad("attention.num_heads");
    if (s.gqa.num_kv_heads == 0 || s.gqa.num_heads % s.gqa.num_kv_heads != 0)
      return make_error(error_code::invalid_config,
                        "model shape '" + s.name + "': 'attention.num_kv_heads' must divide num_heads");
    if (s.gqa.head_dim == 0)
      return bad("attention.head_dim");
  } else {
    if (s.mla.num_heads == 0)
      return bad("attention.num_heads");
    if (s.mla.kv_lora_rank == 0)
      return bad("attention.kv_lora_rank");
    if (s.mla.qk_nope_head_dim + s.mla.qk_rope_head_dim == 0)
      return bad("attention.qk_nope_head_dim");
    if (s.mla.v_head_dim == 0)
      return bad("attention.v_head_dim");
  }
  return status::success();
}

std::vector<gemm_dims> attention_gemms(const model_shape& s) {
  std::size_t m = s.hidden;
  if (s.attention == attention_kind::gqa) {
    const gqa_shape& a = s.gqa;
    return {{m, a.num_heads * a.head_dim},
            {m, a.num_kv_heads * a.head_dim},
            {m, a.num_kv_heads * a.head_dim},
            {a.num_heads * a.head_dim, m}};
  }
  const mla_shape& a = s.mla;
  std::size_t qk = a.qk_nope_head_dim + a.qk_rope_head_dim;
  std::vector<gemm_dims> g;
  if (a.q_lora_rank > 0) {
    g.push_back({m, a.q_lora_rank});
    g.push_back({a.q_lora_rank, a.num_heads * qk});
  } else {
    g.push_back({m, a.num_heads * qk});
  }
  g.push_back({m, a.kv_lora_rank + a.qk_rope_head_dim});
  g.push_back({a.kv_lora_rank, a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)});
  g.push_back({a.num_heads * a.v_head_dim, m});
  return g;
}

std::uint64_t attention_params(const model_shape& s) {
  std::uint64_t total = 0;
  for (const gemm_dims& g : attention_gemms(s))
    total += std::uint64_t(g.k) * g.n;
  return total;
}

std::uint64_t attention_core_macs_per_pair(const model_shape& s) {
  if (s.attention == attention_kind::gqa)
    return std::uint64_t(s.gqa.num_heads) * 2 * s.gqa.head_dim;
  const mla_shape& a = s.mla;
  return std::uint64_t(a.num_heads) * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim);
}

std::uint64_t kv_bytes_per_token_per_layer(const model_shape& s) {
  std::uint64_t elements = s.attention == attention_kind::gqa
                               ? 2ull * s.gqa.num_kv_heads * s.gqa.head_dim
                               : std::uint64_t(s.mla.kv_lora_rank) + s.mla.qk_rope_head_dim;
  return elements * s.dtype_bytes;
}

}  // namespace moert::policy
