#include "model/layers.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace moert::model {

namespace {

// Scratch activations in backend memory (contents unspecified until written).
gpu::buffer scratch(gpu::backend& b, std::size_t num_floats) {
  return b.allocate(num_floats * sizeof(float));
}

void linear(gpu::backend& b, const float* in, std::size_t num_rows, const linear_weights& w, float* out) {
  b.matmul(in, num_rows, w.weight, out, w.bias.empty() ? nullptr : w.bias.floats());
}

void mlp(gpu::backend& b, const mlp_weights& w, const float* in, std::size_t num_rows, float* out) {
  std::size_t inter = std::size_t(w.intermediate_size());
  gpu::buffer gate_up = scratch(b, num_rows * 2 * inter);
  b.matmul(in, num_rows, w.gate_up, gate_up.floats());
  gpu::buffer act = scratch(b, num_rows * inter);
  b.swiglu(gate_up.floats(), num_rows, inter, act.floats());
  b.matmul(act.floats(), num_rows, w.down, out);
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
                        gpu::backend& b) {
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

  gpu::buffer normed = scratch(b, num_rows * hidden);
  b.rms_norm(x, num_rows, hidden, hidden, layer.input_norm.floats(), c.rms_norm_eps, normed.floats());
  gpu::buffer q = scratch(b, num_rows * q_dim), kv = scratch(b, num_rows * row);
  if (c.q_lora_rank > 0) {
    std::size_t q_rank = std::size_t(c.q_lora_rank);
    gpu::buffer q_latent = scratch(b, num_rows * q_rank);
    linear(b, normed.floats(), num_rows, a.q_a, q_latent.floats());
    b.rms_norm(q_latent.floats(), num_rows, q_rank, q_rank, a.q_a_norm.floats(), latent_eps, q_latent.floats());
    linear(b, q_latent.floats(), num_rows, a.q_b, q.floats());
  } else {
    linear(b, normed.floats(), num_rows, a.q, q.floats());
  }
  linear(b, normed.floats(), num_rows, a.kv_a, kv.floats());

  // Normalised latent and roped k_pe into the cache (every token before any attends).
  std::vector<std::size_t> positions(num_rows);
  std::vector<float*> cache_rows(num_rows);
  std::vector<gpu::kv_rows> attended(num_rows);
  for (std::size_t t = 0; t < num_rows; ++t) {
    positions[t] = tokens[t].position;
    cache_rows[t] = tokens[t].cache->keys(layer_idx) + tokens[t].position * row;
    attended[t] = {tokens[t].cache->keys(layer_idx), nullptr, tokens[t].position + 1};
  }
  b.rms_norm(kv.floats(), num_rows, rank, row, a.kv_a_norm.floats(), latent_eps, kv.floats());
  b.rope(kv.floats() + rank, num_rows, row, 1, 0, rope_dim, gpu::rope_style::interleaved, rope.table(),
         positions.data());
  b.scatter_rows(kv.floats(), row, num_rows, row, cache_rows.data());
  b.rope(q.floats() + nope, num_rows, q_dim, num_heads, q_head, rope_dim, gpu::rope_style::interleaved,
         rope.table(), positions.data());

  // Absorbed queries, per head [W_UK_hᵀ · q_nope_h, q_pe_h]: a score is one dot with a row.
  gpu::buffer q_abs = scratch(b, num_rows * num_heads * row);
  gpu::buffer gathered = scratch(b, num_rows * std::max(nope, rank));
  gpu::buffer projected = scratch(b, num_rows * std::max(rank, v_dim));
  for (std::size_t h = 0; h < num_heads; ++h) {
    b.copy_rows(q.floats() + h * q_head, q_dim, gathered.floats(), nope, num_rows, nope);
    b.matmul(gathered.floats(), num_rows, a.k_absorb[h], projected.floats());
    b.copy_rows(projected.floats(), rank, q_abs.floats() + h * row, num_heads * row, num_rows, rank);
    b.copy_rows(q.floats() + h * q_head + nope, q_dim, q_abs.floats() + h * row + rank, num_heads * row, num_rows,
                rope_dim);
  }

  gpu::buffer latent = scratch(b, num_rows * num_heads * rank);
  b.mla_attention(q_abs.floats(), attended, {num_heads, row, rank, row, rope.attention_scale()}, latent.floats());

  // Per head, the attended latent through W_UV_h, then o_proj over the heads' outputs.
  gpu::buffer attn = scratch(b, num_rows * num_heads * v_dim);
  for (std::size_t h = 0; h < num_heads; ++h) {
    b.copy_rows(latent.floats() + h * rank, num_heads * rank, gathered.floats(), rank, num_rows, rank);
    b.matmul(gathered.floats(), num_rows, a.v_up[h], projected.floats());
    b.copy_rows(projected.floats(), v_dim, attn.floats() + h * v_dim, num_heads * v_dim, num_rows, v_dim);
  }
  gpu::buffer out = scratch(b, num_rows * hidden);
  linear(b, attn.floats(), num_rows, a.o, out.floats());
  b.add(x, out.floats(), num_rows * hidden);
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

void embed_step(const model_config& c, const model_weights& weights, std::span<const std::int32_t> token_ids,
                float* x, gpu::backend& b) {
  std::size_t hidden = std::size_t(c.hidden_size);
  std::vector<const float*> rows(token_ids.size());
  for (std::size_t r = 0; r < token_ids.size(); ++r)
    rows[r] = weights.embedding.floats() + std::size_t(token_ids[r]) * hidden;
  b.gather_rows(rows.data(), rows.size(), hidden, x);
}

void attention_step(const model_config& c, const model_weights& weights, const rope_table& rope,
                    std::size_t layer_idx, std::span<const token_slot> tokens, float* x,
                    gpu::backend& b) {
  const layer_weights& layer = weights.layers[layer_idx];
  if (c.mla())
    return mla_attention_step(c, layer, rope, layer_idx, tokens, x, b);
  const attention_weights& a = layer.attention;
  std::size_t hidden = std::size_t(c.hidden_size);
  std::size_t head_dim = std::size_t(c.head_dim);
  std::size_t num_heads = std::size_t(c.num_heads);
  std::size_t num_kv_heads = std::size_t(c.num_kv_heads);
  std::size_t q_dim = std::size_t(c.q_dim());
  std::size_t kv_dim = std::size_t(c.kv_dim());
  std::size_t num_rows = tokens.size();

  gpu::buffer normed = scratch(b, num_rows * hidden);
  b.rms_norm(x, num_rows, hidden, hidden, layer.input_norm.floats(), c.rms_norm_eps, normed.floats());
  // One matmul for q, k and v (attention_weights::qkv): a row of its output is [q | k | v].
  // The per-head norms and attention want q and k rows packed, so with several rows those two
  // are copied out (exact); a single row's parts are packed already.
  std::size_t qkv_dim = q_dim + 2 * kv_dim;
  gpu::buffer qkv = scratch(b, num_rows * qkv_dim);
  linear(b, normed.floats(), num_rows, a.qkv, qkv.floats());
  gpu::buffer q_packed, k_packed;
  float* q = qkv.floats();
  float* k = qkv.floats() + q_dim;
  const float* v = qkv.floats() + q_dim + kv_dim;
  if (num_rows > 1) {
    q_packed = scratch(b, num_rows * q_dim);
    k_packed = scratch(b, num_rows * kv_dim);
    b.copy_rows(q, qkv_dim, q_packed.floats(), q_dim, num_rows, q_dim);
    b.copy_rows(k, qkv_dim, k_packed.floats(), kv_dim, num_rows, kv_dim);
    q = q_packed.floats();
    k = k_packed.floats();
  }

  // Per-head norm (qwen3) and RoPE, then K and V into the cache: every token of the batch is
  // written before any attends, so a prefill chunk sees its own earlier tokens.
  if (c.qk_norm) {
    b.rms_norm(q, num_rows * num_heads, head_dim, head_dim, a.q_norm.floats(), c.rms_norm_eps, q);
    b.rms_norm(k, num_rows * num_kv_heads, head_dim, head_dim, a.k_norm.floats(), c.rms_norm_eps, k);
  }
  std::vector<std::size_t> positions(num_rows);
  std::vector<float*> key_rows(num_rows), value_rows(num_rows);
  std::vector<gpu::kv_rows> attended(num_rows);
  for (std::size_t t = 0; t < num_rows; ++t) {
    kv_cache& cache = *tokens[t].cache;
    positions[t] = tokens[t].position;
    key_rows[t] = cache.keys(layer_idx) + tokens[t].position * kv_dim;
    value_rows[t] = cache.values(layer_idx) + tokens[t].position * kv_dim;
    attended[t] = {cache.keys(layer_idx), cache.values(layer_idx), tokens[t].position + 1};
  }
  b.rope(q, num_rows, q_dim, num_heads, head_dim, head_dim, gpu::rope_style::rotate_half, rope.table(),
         positions.data());
  b.rope(k, num_rows, kv_dim, num_kv_heads, head_dim, head_dim, gpu::rope_style::rotate_half, rope.table(),
         positions.data());
  b.scatter_rows(k, kv_dim, num_rows, kv_dim, key_rows.data());
  b.scatter_rows(v, qkv_dim, num_rows, kv_dim, value_rows.data());

  gpu::buffer attn = scratch(b, num_rows * q_dim);
  b.attention(q, attended, {num_heads, num_kv_heads, head_dim, kv_dim, rope.attention_scale()},
              attn.floats());

  gpu::buffer out = scratch(b, num_rows * hidden);
  linear(b, attn.floats(), num_rows, a.o, out.floats());
  b.add(x, out.floats(), num_rows * hidden);
}

void route_step(const model_config& c, const model_weights& weights, std::size_t layer_idx,
                const float* x, std::size_t num_rows, float* normed, routed_slot* routes,
                gpu::backend& b) {
  const layer_weights& layer = weights.layers[layer_idx];
  std::size_t hidden = std::size_t(c.hidden_size);
  b.rms_norm(x, num_rows, hidden, hidden, layer.post_attention_norm.floats(), c.rms_norm_eps, normed);
  if (!c.sparse_layers[layer_idx])
    return;
  gpu::route_params p;
  p.num_experts = std::size_t(c.num_experts);
  p.top_k = std::size_t(c.num_experts_per_tok);
  if (c.topk == topk_method::group_limited_greedy) {
    p.num_groups = std::size_t(c.n_group);
    p.topk_group = std::size_t(c.topk_group);
  }
  p.renormalize = c.norm_topk_prob;
  p.scaling = c.routed_scaling_factor;
  gpu::buffer probs = scratch(b, num_rows * p.num_experts);
  b.matmul(normed, num_rows, layer.router, probs.floats());
  b.route(probs.floats(), num_rows, p, routes);
}

bool has_side_ffn(const model_config& c, std::size_t layer) {
  return !c.sparse_layers[layer] || c.shared_expert_intermediate_size > 0;
}

void side_ffn_step(const model_config& c, const model_weights& weights, std::size_t layer_idx,
                   const float* normed, std::size_t num_rows, float* out, gpu::backend& b) {
  const layer_weights& layer = weights.layers[layer_idx];
  if (!c.sparse_layers[layer_idx]) {
    mlp(b, layer.dense_mlp, normed, num_rows, out);
    return;
  }
  mlp(b, layer.shared_expert, normed, num_rows, out);
  if (!c.shared_expert_gated)
    return;
  gpu::buffer gate = scratch(b, num_rows);
  b.matmul(normed, num_rows, layer.shared_expert_gate, gate.floats());
  b.sigmoid_gate(gate.floats(), num_rows, std::size_t(c.hidden_size), out);
}

void expert_step(const model_weights& weights, std::size_t layer, std::size_t expert, const float* in,
                 std::size_t num_rows, float* out, gpu::backend& b) {
  const expert_rows one{expert, in, num_rows, out};
  experts_step(weights, layer, {&one, 1}, b);
}

// mlp() for several experts at once: the gate/up GEMMs of all of them, the SwiGLUs, then the
// down GEMMs, each set in one matmul_batch.
void experts_step(const model_weights& weights, std::size_t layer, std::span<const expert_rows> batch,
                  gpu::backend& b) {
  std::vector<gpu::buffer> gate_up(batch.size()), act(batch.size());
  std::vector<gpu::batched_matmul> gemms;
  gemms.reserve(batch.size());
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const mlp_weights& w = weights.layers[layer].experts[batch[i].expert];
    std::size_t inter = std::size_t(w.intermediate_size());
    gate_up[i] = scratch(b, batch[i].num_rows * 2 * inter);
    act[i] = scratch(b, batch[i].num_rows * inter);
    gemms.push_back({&w.gate_up, batch[i].in, gate_up[i].floats(), batch[i].num_rows});
  }
  b.matmul_batch(gemms);
  gemms.clear();
  for (std::size_t i = 0; i < batch.size(); ++i) {
    const mlp_weights& w = weights.layers[layer].experts[batch[i].expert];
    std::size_t inter = std::size_t(w.intermediate_size());
    b.swiglu(gate_up[i].floats(), batch[i].num_rows, inter, act[i].floats());
    gemms.push_back({&w.down, act[i].floats(), batch[i].out, batch[i].num_rows});
  }
  b.matmul_batch(gemms);
}

void weight_row(const float* y, float weight, std::size_t hidden, float* out) {
  for (std::size_t i = 0; i < hidden; ++i)
    out[i] = y[i] * weight;
}

void combine_step(std::size_t hidden, std::size_t top_k, const float* const* weighted, const float* side,
                  std::size_t num_rows, float* x, gpu::backend& b) {
  b.combine(weighted, top_k, side, num_rows, hidden, x);
}

void logits_step(const model_config& c, const model_weights& weights, const float* x,
                 std::size_t num_rows, float* logits, gpu::backend& b) {
  std::size_t hidden = std::size_t(c.hidden_size);
  gpu::buffer normed = scratch(b, num_rows * hidden);
  b.rms_norm(x, num_rows, hidden, hidden, weights.final_norm.floats(), c.rms_norm_eps, normed.floats());
  b.matmul(normed.floats(), num_rows, weights.lm_head, logits);
}

}  // namespace moert::model
