#include "model/layers.hpp"

#include "gpu/cpu/gemm.hpp"
#include "gpu/cpu/ops.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

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

// YaRN's magnitude correction for a context stretched by `factor` (DeepSeek's yarn_get_mscale).
double yarn_mscale(double factor, double mscale) {
  return factor <= 1.0 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0;
}

// Multi-head latent attention with kv_b_proj absorbed (weights.hpp): each token caches one
// compressed row and queries attend over those rows directly. Prefill and decode run this same
// per-token computation, so a token's bits do not depend on how its sequence was split into
// forward passes (and decode never expands the cache per head).
void mla_attention_step(const model_config& c, const layer_weights& layer, const rope_table& rope,
                        std::size_t layer_idx, std::span<const token_slot> tokens, float* x,
                        cpu::thread_pool* pool) {
  const attention_weights& a = layer.attention;
  constexpr float latent_eps = 1e-6f;  // q_a_layernorm and kv_a_layernorm ignore rms_norm_eps
  std::size_t hidden = std::size_t(c.hidden_size);
  std::size_t num_heads = std::size_t(c.num_heads);
  std::size_t rank = std::size_t(c.kv_lora_rank);
  std::size_t nope = std::size_t(c.qk_nope_head_dim);
  std::size_t rope_dim = std::size_t(c.qk_rope_head_dim);
  std::size_t v_dim = std::size_t(c.v_head_dim);
  std::size_t q_head = nope + rope_dim;
  std::size_t q_dim = std::size_t(c.q_dim());
  std::size_t row = rank + rope_dim;  // one cache row: latent, then k_pe
  std::size_t num_rows = tokens.size();

  std::vector<float> normed(num_rows * hidden);
  for (std::size_t t = 0; t < num_rows; ++t)
    cpu::rms_norm(x + t * hidden, layer.input_norm.data(), hidden, c.rms_norm_eps, normed.data() + t * hidden);
  std::vector<float> q(num_rows * q_dim), kv(num_rows * row);
  if (c.q_lora_rank > 0) {
    std::size_t q_rank = std::size_t(c.q_lora_rank);
    std::vector<float> q_latent(num_rows * q_rank);
    linear(normed.data(), num_rows, a.q_a, q_latent.data(), pool);
    for (std::size_t t = 0; t < num_rows; ++t)
      cpu::rms_norm(q_latent.data() + t * q_rank, a.q_a_norm.data(), q_rank, latent_eps,
                    q_latent.data() + t * q_rank);
    linear(q_latent.data(), num_rows, a.q_b, q.data(), pool);
  } else {
    linear(normed.data(), num_rows, a.q, q.data(), pool);
  }
  linear(normed.data(), num_rows, a.kv_a, kv.data(), pool);

  // Normalised latent and roped k_pe into the cache (every token before any attends).
  std::size_t half = rope_dim / 2;
  for (std::size_t t = 0; t < num_rows; ++t) {
    const float* cs = rope.row(tokens[t].position);
    float* kvt = kv.data() + t * row;
    cpu::rms_norm(kvt, a.kv_a_norm.data(), rank, latent_eps, kvt);
    cpu::rope_interleaved(kvt + rank, rope_dim, cs, cs + half);
    std::copy_n(kvt, row, tokens[t].cache->keys(layer_idx) + tokens[t].position * row);
    for (std::size_t h = 0; h < num_heads; ++h)
      cpu::rope_interleaved(q.data() + t * q_dim + h * q_head + nope, rope_dim, cs, cs + half);
  }

  // Absorbed queries, per head [W_UK_hᵀ · q_nope_h, q_pe_h]: a score is one dot with a row.
  std::vector<float> q_abs(num_rows * num_heads * row);
  std::vector<float> gathered(num_rows * std::max(nope, rank)), projected(num_rows * std::max(rank, v_dim));
  for (std::size_t h = 0; h < num_heads; ++h) {
    for (std::size_t t = 0; t < num_rows; ++t)
      std::copy_n(q.data() + t * q_dim + h * q_head, nope, gathered.data() + t * nope);
    cpu::matmul(gathered.data(), num_rows, a.k_absorb[h], projected.data(), pool);
    for (std::size_t t = 0; t < num_rows; ++t) {
      float* dst = q_abs.data() + (t * num_heads + h) * row;
      std::copy_n(projected.data() + t * rank, rank, dst);
      std::copy_n(q.data() + t * q_dim + h * q_head + nope, rope_dim, dst + rank);
    }
  }

  std::vector<float> latent(num_rows * num_heads * rank);
  auto attend_rows = [&](std::size_t begin, std::size_t end) {
    std::vector<float> scores;
    for (std::size_t t = begin; t < end; ++t) {
      std::size_t num_positions = tokens[t].position + 1;
      scores.resize(num_positions);
      cpu::attend_shared_row(q_abs.data() + t * num_heads * row, tokens[t].cache->keys(layer_idx), row,
                             num_positions, num_heads, row, rank, rope.attention_scale(), scores.data(),
                             latent.data() + t * num_heads * rank);
    }
  };
  std::size_t work = 0;  // scalar loops: a multiply-add here costs ~32 of the matmul's
  for (const token_slot& t : tokens)
    work += 32 * (t.position + 1) * num_heads * (row + rank);
  cpu::parallel_for_if_worth(pool, work, num_rows, attend_rows);

  // Per head, the attended latent through W_UV_h, then o_proj over the heads' outputs.
  std::vector<float> attn(num_rows * num_heads * v_dim);
  for (std::size_t h = 0; h < num_heads; ++h) {
    for (std::size_t t = 0; t < num_rows; ++t)
      std::copy_n(latent.data() + (t * num_heads + h) * rank, rank, gathered.data() + t * rank);
    cpu::matmul(gathered.data(), num_rows, a.v_up[h], projected.data(), pool);
    for (std::size_t t = 0; t < num_rows; ++t)
      std::copy_n(projected.data() + t * v_dim, v_dim, attn.data() + (t * num_heads + h) * v_dim);
  }
  std::vector<float> out(num_rows * hidden);
  linear(attn.data(), num_rows, a.o, out.data(), pool);
  for (std::size_t i = 0; i < num_rows * hidden; ++i)
    x[i] += out[i];
}

}  // namespace

rope_table::rope_table(const model_config& config) : inv_freq_(std::size_t(config.rope_dim() / 2)) {
  double dim = double(config.rope_dim());
  auto pos_freq = [&](std::size_t i) { return std::pow(config.rope_theta, double(2 * i) / dim); };
  attention_scale_ = 1.0f / std::sqrt(float(config.head_dim));
  if (!config.has_yarn) {
    for (std::size_t i = 0; i < inv_freq_.size(); ++i)
      inv_freq_[i] = float(1.0 / pos_freq(i));
    return;
  }
  // YaRN: frequencies below `low` are kept (extrapolated), those above `high` divided by the
  // factor (interpolated), blended linearly in between (DeepSeek's yarn_find_correction_range
  // and yarn_linear_ramp_mask).
  const yarn_scaling& y = config.yarn;
  auto correction = [&](double rotations) {
    return dim * std::log(y.original_max_position_embeddings / (rotations * 2.0 * std::numbers::pi)) /
           (2.0 * std::log(config.rope_theta));
  };
  double low = std::max(std::floor(correction(y.beta_fast)), 0.0);
  double high = std::min(std::ceil(correction(y.beta_slow)), dim - 1.0);
  if (low == high)
    high += 0.001;  // as DeepSeek does, to avoid dividing by zero
  for (std::size_t i = 0; i < inv_freq_.size(); ++i) {
    double ramp = std::clamp((double(i) - low) / (high - low), 0.0, 1.0);
    inv_freq_[i] = float(ramp / (y.factor * pos_freq(i)) + (1.0 - ramp) / pos_freq(i));
  }
  double all_dim = yarn_mscale(y.factor, y.mscale_all_dim);
  magnitude_ = float(yarn_mscale(y.factor, y.mscale) / all_dim);
  attention_scale_ = float(all_dim * all_dim / std::sqrt(double(config.head_dim)));
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
      out[i] = float(std::cos(double(angle))) * magnitude_;
      out[half + i] = float(std::sin(double(angle))) * magnitude_;
    }
  }
}

void attention_step(const model_config& c, const model_weights& weights, const rope_table& rope,
                    std::size_t layer_idx, std::span<const token_slot> tokens, float* x,
                    cpu::thread_pool* pool) {
  const layer_weights& layer = weights.layers[layer_idx];
  if (c.mla())
    return mla_attention_step(c, layer, rope, layer_idx, tokens, x, pool);
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
  float scale = rope.attention_scale();
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
  std::size_t work = 0;  // scalar loops: a multiply-add here costs ~32 of the matmul's
  for (const token_slot& t : tokens)
    work += 32 * (t.position + 1) * 2 * q_dim;
  cpu::parallel_for_if_worth(pool, work, num_rows, attend_rows);

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

  // f32 softmax over all experts, then the top-k among the eligible ones (ties to the lower
  // index). Group-limited: only the topk_group groups with the best maximum are eligible, the
  // others' probabilities read as 0 for the selection (DeepSeek's masked_fill).
  std::size_t num_experts = std::size_t(c.num_experts);
  std::size_t top_k = std::size_t(c.num_experts_per_tok);
  std::size_t num_groups = c.topk == topk_method::group_limited_greedy ? std::size_t(c.n_group) : 1;
  std::size_t group_size = num_experts / num_groups;
  std::vector<float> probs(num_rows * num_experts);
  cpu::matmul(normed, num_rows, layer.router, probs.data(), pool);
  std::vector<std::int32_t> order(num_experts), groups(num_groups);
  std::vector<float> eligible(num_experts), group_max(num_groups);
  auto by_value = [](const float* v) {
    return [v](std::int32_t a, std::int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); };
  };
  for (std::size_t t = 0; t < num_rows; ++t) {
    float* p = probs.data() + t * num_experts;
    cpu::softmax(p, num_experts);
    std::copy_n(p, num_experts, eligible.begin());
    if (num_groups > 1) {
      for (std::size_t g = 0; g < num_groups; ++g) {
        group_max[g] = *std::max_element(p + g * group_size, p + (g + 1) * group_size);
        groups[g] = std::int32_t(g);
      }
      std::size_t keep = std::size_t(c.topk_group);
      std::partial_sort(groups.begin(), groups.begin() + std::ptrdiff_t(keep), groups.end(),
                        by_value(group_max.data()));
      for (std::size_t i = keep; i < num_groups; ++i)
        std::fill_n(eligible.begin() + std::ptrdiff_t(std::size_t(groups[i]) * group_size), group_size, 0.0f);
    }
    for (std::size_t e = 0; e < num_experts; ++e)
      order[e] = std::int32_t(e);
    std::partial_sort(order.begin(), order.begin() + std::ptrdiff_t(top_k), order.end(),
                      by_value(eligible.data()));
    routed_slot* r = routes + t * top_k;
    float sum = 0.0f;
    for (std::size_t s = 0; s < top_k; ++s) {
      r[s] = {order[s], p[order[s]]};
      sum += r[s].weight;
    }
    for (std::size_t s = 0; s < top_k; ++s)
      r[s].weight = (c.norm_topk_prob ? r[s].weight / sum : r[s].weight) * c.routed_scaling_factor;
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
  mlp(layer.shared_expert, normed, num_rows, out, pool);
  if (!c.shared_expert_gated)
    return;
  std::vector<float> gate(num_rows);
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
