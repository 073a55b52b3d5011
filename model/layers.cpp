#include "model/layers.hpp"

#include "gpu/cpu/gemm.hpp"
#include "gpu/cpu/ops.hpp"

#include <algorithm>
#include <cmath>

namespace moert::model {

namespace {

void linear(const float* in, std::size_t num_rows, const linear_weights& w, float* out,
            cpu::thread_pool* pool) {
  cpu::matmul(in, num_rows, w.weight, out, pool);
  if (w.bias.empty())
    return;
  for (std::size_t r = 0; r < num_rows; ++r)
    for (std::size_t i = 0; i < w.bias.size(); ++i)
      out[r * w.bias.size() + i] += w.bias[i];
}

void mlp(const mlp_weights& w, const float* in, std::size_t num_rows, float* out, cpu::thread_pool* pool) {
  std::size_t inter = std::size_t(w.intermediate_size());
  std::vector<float> gate_up(num_rows * 2 * inter);
  cpu::matmul(in, num_rows, w.gate_up, gate_up.data(), pool);
  std::vector<float> act(num_rows * inter);
  for (std::size_t r = 0; r < num_rows; ++r) {
    const float* g = gate_up.data() + r * 2 * inter;
    cpu::silu_mul(g, g + inter, inter, act.data() + r * inter);
  }
  cpu::matmul(act.data(), num_rows, w.down, out, pool);
}

}  // namespace

rope_table::rope_table(const model_config& config) : inv_freq_(std::size_t(config.head_dim / 2)) {
  for (std::size_t i = 0; i < inv_freq_.size(); ++i)
    inv_freq_[i] = float(1.0 / std::pow(config.rope_theta, double(2 * i) / double(config.head_dim)));
}

void rope_table::ensure(std::size_t max_position) {
  std::size_t half = inv_freq_.size();
  std::size_t known = cos_sin_.size() / (2 * half);
  if (max_position < known)
    return;
  cos_sin_.resize((max_position + 1) * 2 * half);
  for (std::size_t p = known; p <= max_position; ++p) {
    float* out = cos_sin_.data() + p * 2 * half;
    for (std::size_t i = 0; i < half; ++i) {
      float angle = float(p) * inv_freq_[i];
      out[i] = float(std::cos(double(angle)));
      out[half + i] = float(std::sin(double(angle)));
    }
  }
}

void attention_step(const model_config& c, const model_weights& weights, const rope_table& rope,
                    std::size_t layer_idx, std::span<const token_slot> tokens, float* x,
                    cpu::thread_pool* pool) {
  const layer_weights& layer = weights.layers[layer_idx];
  const attention_weights& a = layer.attention;
  std::size_t hidden = std::size_t(c.hidden_size);
  std::size_t head_dim = std::size_t(c.head_dim);
  std::size_t num_heads = std::size_t(c.num_heads);
  std::size_t num_kv_heads = std::size_t(c.num_kv_heads);
  std::size_t q_dim = std::size_t(c.q_dim());
  std::size_t kv_dim = std::size_t(c.kv_dim());
  std::size_t num_rows = tokens.size();

  std::vector<float> normed(num_rows * hidden);
  for (std::size_t t = 0; t < num_rows; ++t)
    cpu::rms_norm(x + t * hidden, layer.input_norm.data(), hidden, c.rms_norm_eps, normed.data() + t * hidden);
  std::vector<float> q(num_rows * q_dim), k(num_rows * kv_dim), v(num_rows * kv_dim);
  linear(normed.data(), num_rows, a.q, q.data(), pool);
  linear(normed.data(), num_rows, a.k, k.data(), pool);
  linear(normed.data(), num_rows, a.v, v.data(), pool);

  // Per-head norm (qwen3) and RoPE, then K and V into the cache: every token of the batch is
  // written before any attends, so a prefill chunk sees its own earlier tokens.
  for (std::size_t t = 0; t < num_rows; ++t) {
    const float* cs = rope.row(tokens[t].position);
    float* qt = q.data() + t * q_dim;
    float* kt = k.data() + t * kv_dim;
    for (std::size_t h = 0; h < num_heads; ++h) {
      if (c.qk_norm)
        cpu::rms_norm(qt + h * head_dim, a.q_norm.data(), head_dim, c.rms_norm_eps, qt + h * head_dim);
      cpu::rope_rotate_half(qt + h * head_dim, head_dim, cs, cs + head_dim / 2);
    }
    for (std::size_t h = 0; h < num_kv_heads; ++h) {
      if (c.qk_norm)
        cpu::rms_norm(kt + h * head_dim, a.k_norm.data(), head_dim, c.rms_norm_eps, kt + h * head_dim);
      cpu::rope_rotate_half(kt + h * head_dim, head_dim, cs, cs + head_dim / 2);
    }
    kv_cache& cache = *tokens[t].cache;
    std::copy_n(kt, kv_dim, cache.keys(layer_idx) + tokens[t].position * kv_dim);
    std::copy_n(v.data() + t * kv_dim, kv_dim, cache.values(layer_idx) + tokens[t].position * kv_dim);
  }

  std::vector<float> attn(num_rows * q_dim);
  float scale = 1.0f / std::sqrt(float(head_dim));
  auto attend_rows = [&](std::size_t begin, std::size_t end) {
    std::vector<float> scores;
    for (std::size_t t = begin; t < end; ++t) {
      const kv_cache& cache = *tokens[t].cache;
      std::size_t num_positions = tokens[t].position + 1;
      scores.resize(num_positions);
      cpu::attend(q.data() + t * q_dim, cache.keys(layer_idx), cache.values(layer_idx), kv_dim,
                  num_positions, num_heads, num_kv_heads, head_dim, scale, scores.data(),
                  attn.data() + t * q_dim);
    }
  };
  if (pool)
    pool->parallel_for(num_rows, attend_rows);
  else
    attend_rows(0, num_rows);

  std::vector<float> out(num_rows * hidden);
  linear(attn.data(), num_rows, a.o, out.data(), pool);
  for (std::size_t i = 0; i < num_rows * hidden; ++i)
    x[i] += out[i];
}

void route_step(const model_config& c, const model_weights& weights, std::size_t layer_idx,
                const float* x, std::size_t num_rows, float* normed, routed_slot* routes,
                cpu::thread_pool* pool) {
  const layer_weights& layer = weights.layers[layer_idx];
  std::size_t hidden = std::size_t(c.hidden_size);
  for (std::size_t t = 0; t < num_rows; ++t)
    cpu::rms_norm(x + t * hidden, layer.post_attention_norm.data(), hidden, c.rms_norm_eps,
                  normed + t * hidden);
  if (!c.sparse_layers[layer_idx])
    return;

  // f32 softmax over all experts, then the top-k (ties to the lower index).
  std::size_t num_experts = std::size_t(c.num_experts);
  std::size_t top_k = std::size_t(c.num_experts_per_tok);
  std::vector<float> probs(num_rows * num_experts);
  cpu::matmul(normed, num_rows, layer.router, probs.data(), pool);
  std::vector<std::int32_t> order(num_experts);
  for (std::size_t t = 0; t < num_rows; ++t) {
    float* p = probs.data() + t * num_experts;
    cpu::softmax(p, num_experts);
    for (std::size_t e = 0; e < num_experts; ++e)
      order[e] = std::int32_t(e);
    std::partial_sort(order.begin(), order.begin() + std::ptrdiff_t(top_k), order.end(),
                      [&](std::int32_t a, std::int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    routed_slot* r = routes + t * top_k;
    float sum = 0.0f;
    for (std::size_t s = 0; s < top_k; ++s) {
      r[s] = {order[s], p[order[s]]};
      sum += r[s].weight;
    }
    if (c.norm_topk_prob)
      for (std::size_t s = 0; s < top_k; ++s)
        r[s].weight /= sum;
    // The combine sums in slot order: expert-index order, never rank or arrival (DESIGN.md §4).
    std::sort(r, r + top_k, [](const routed_slot& a, const routed_slot& b) { return a.expert < b.expert; });
  }
}

bool has_side_ffn(const model_config& c, std::size_t layer) {
  return !c.sparse_layers[layer] || c.shared_expert_intermediate_size > 0;
}

void side_ffn_step(const model_config& c, const model_weights& weights, std::size_t layer_idx,
                   const float* normed, std::size_t num_rows, float* out, cpu::thread_pool* pool) {
  const layer_weights& layer = weights.layers[layer_idx];
  std::size_t hidden = std::size_t(c.hidden_size);
  if (!c.sparse_layers[layer_idx]) {
    mlp(layer.dense_mlp, normed, num_rows, out, pool);
    return;
  }
  std::vector<float> gate(num_rows);
  mlp(layer.shared_expert, normed, num_rows, out, pool);
  cpu::matmul(normed, num_rows, layer.shared_expert_gate, gate.data(), pool);
  for (std::size_t t = 0; t < num_rows; ++t) {
    float g = 1.0f / (1.0f + std::exp(-gate[t]));
    for (std::size_t i = 0; i < hidden; ++i)
      out[t * hidden + i] = g * out[t * hidden + i];
  }
}

void expert_step(const model_weights& weights, std::size_t layer, std::size_t expert, const float* in,
                 std::size_t num_rows, float* out, cpu::thread_pool* pool) {
  mlp(weights.layers[layer].experts[expert], in, num_rows, out, pool);
}

void weight_row(const float* y, float weight, std::size_t hidden, float* out) {
  for (std::size_t i = 0; i < hidden; ++i)
    out[i] = y[i] * weight;
}

void combine_step(std::size_t hidden, std::size_t top_k, const float* const* weighted, const float* side,
                  std::size_t num_rows, float* x) {
  std::vector<float> combined(hidden);
  for (std::size_t t = 0; t < num_rows; ++t) {
    std::fill(combined.begin(), combined.end(), 0.0f);
    for (std::size_t s = 0; s < top_k; ++s) {
      const float* y = weighted[t * top_k + s];
      for (std::size_t i = 0; i < hidden; ++i)
        combined[i] += y[i];
    }
    if (side)
      for (std::size_t i = 0; i < hidden; ++i)
        combined[i] += side[t * hidden + i];
    for (std::size_t i = 0; i < hidden; ++i)
      x[t * hidden + i] += combined[i];
  }
}

void logits_step(const model_config& c, const model_weights& weights, const float* x,
                 std::size_t num_rows, float* logits, cpu::thread_pool* pool) {
  std::size_t hidden = std::size_t(c.hidden_size);
  std::vector<float> normed(num_rows * hidden);
  for (std::size_t r = 0; r < num_rows; ++r)
    cpu::rms_norm(x + r * hidden, weights.final_norm.data(), hidden, c.rms_norm_eps, normed.data() + r * hidden);
  cpu::matmul(normed.data(), num_rows, weights.lm_head, logits, pool);
}

}  // namespace moert::model
