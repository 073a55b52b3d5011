#include "model/forward.hpp"

#include "gpu/cpu/ops.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <set>
#include <string>

namespace moert::model {

namespace {

void add_bias(float* rows, std::size_t num_rows, const std::vector<float>& bias) {
  if (bias.empty())
    return;
  for (std::size_t r = 0; r < num_rows; ++r)
    for (std::size_t i = 0; i < bias.size(); ++i)
      rows[r * bias.size() + i] += bias[i];
}

void linear(const float* in, std::size_t num_rows, const linear_weights& w, float* out,
            cpu::thread_pool* pool) {
  cpu::matmul(in, num_rows, w.weight, out, pool);
  add_bias(out, num_rows, w.bias);
}

struct routed_slot {
  std::int32_t expert;
  float weight;
};

}  // namespace

// -- kv_cache -----------------------------------------------------------------

kv_cache::kv_cache(const model_config& config)
    : row_floats_(std::size_t(config.kv_dim())),
      keys_(std::size_t(config.num_layers)),
      values_(std::size_t(config.num_layers)) {}

std::size_t kv_cache::num_bytes() const {
  return 2 * keys_.size() * length_ * row_floats_ * sizeof(float);
}

// -- reference_model ----------------------------------------------------------

reference_model::reference_model(model_config config, model_weights weights, std::size_t num_threads)
    : config_(std::move(config)), weights_(std::move(weights)), pool_(num_threads) {
  std::size_t half = std::size_t(config_.head_dim / 2);
  inv_freq_.resize(half);
  for (std::size_t i = 0; i < half; ++i)
    inv_freq_[i] = float(1.0 / std::pow(config_.rope_theta, double(2 * i) / double(config_.head_dim)));
}

const float* reference_model::rope_table(std::size_t position) {
  std::size_t half = inv_freq_.size();
  std::size_t known = rope_cos_sin_.size() / (2 * half);
  if (position >= known) {
    rope_cos_sin_.resize((position + 1) * 2 * half);
    for (std::size_t p = known; p <= position; ++p) {
      float* row = rope_cos_sin_.data() + p * 2 * half;
      for (std::size_t i = 0; i < half; ++i) {
        // As Hugging Face: the angle is an f32 product, cos/sin taken of that f32 angle.
        float angle = float(p) * inv_freq_[i];
        row[i] = float(std::cos(double(angle)));
        row[half + i] = float(std::sin(double(angle)));
      }
    }
  }
  return rope_cos_sin_.data() + position * 2 * half;
}

result<std::vector<float>> reference_model::forward(std::span<const forward_segment> segments,
                                                    logits_for which) {
  const model_config& c = config_;
  std::size_t hidden = std::size_t(c.hidden_size);
  std::size_t num_tokens = 0;
  std::size_t max_position = 0;
  std::set<const kv_cache*> seen;
  for (std::size_t s = 0; s < segments.size(); ++s) {
    const forward_segment& seg = segments[s];
    if (seg.tokens.empty())
      return make_error(error_code::invalid_argument, "sequence " + std::to_string(s) + " has no tokens");
    if (!seen.insert(seg.cache).second)
      return make_error(error_code::invalid_argument,
                        "sequence " + std::to_string(s) + " appears twice in one batch");
    for (std::size_t j = 0; j < seg.tokens.size(); ++j) {
      std::int32_t id = seg.tokens[j];
      if (id < 0 || id >= c.vocab_size)
        return make_error(error_code::invalid_argument,
                          "token id " + std::to_string(id) + " at position " +
                              std::to_string(seg.cache->length() + j) + " of sequence " +
                              std::to_string(s) + " is outside the vocabulary [0, " +
                              std::to_string(c.vocab_size) + ")");
    }
    num_tokens += seg.tokens.size();
    max_position = std::max(max_position, seg.cache->length() + seg.tokens.size() - 1);
  }
  if (num_tokens == 0)
    return std::vector<float>{};
  rope_table(max_position);  // grown here, read-only inside the parallel sections

  for (const forward_segment& seg : segments) {
    std::size_t new_length = seg.cache->length_ + seg.tokens.size();
    for (std::size_t l = 0; l < std::size_t(c.num_layers); ++l) {
      seg.cache->keys_[l].resize(new_length * seg.cache->row_floats_);
      seg.cache->values_[l].resize(new_length * seg.cache->row_floats_);
    }
  }

  std::vector<float> x(num_tokens * hidden);
  std::size_t row = 0;
  for (const forward_segment& seg : segments)
    for (std::int32_t id : seg.tokens)
      std::copy_n(weights_.embedding.data() + std::size_t(id) * hidden, hidden, x.data() + hidden * row++);

  std::vector<float> normed(num_tokens * hidden);
  for (std::size_t l = 0; l < std::size_t(c.num_layers); ++l) {
    const layer_weights& layer = weights_.layers[l];
    attention_block(l, segments, x);
    for (std::size_t t = 0; t < num_tokens; ++t)
      cpu::rms_norm(x.data() + t * hidden, layer.post_attention_norm.data(), hidden, c.rms_norm_eps,
                    normed.data() + t * hidden);
    if (c.sparse_layers[l]) {
      moe_block(layer, normed, num_tokens, x);
    } else {
      std::vector<float> out(num_tokens * hidden);
      mlp(layer.dense_mlp, normed.data(), num_tokens, out.data(), &pool_);
      for (std::size_t i = 0; i < x.size(); ++i)
        x[i] += out[i];
    }
  }
  for (const forward_segment& seg : segments)
    seg.cache->length_ += seg.tokens.size();

  // Final norm and lm_head over the rows asked for.
  std::vector<std::size_t> rows;
  std::size_t first = 0;
  for (const forward_segment& seg : segments) {
    if (which == logits_for::last_token) {
      rows.push_back(first + seg.tokens.size() - 1);
    } else {
      for (std::size_t j = 0; j < seg.tokens.size(); ++j)
        rows.push_back(first + j);
    }
    first += seg.tokens.size();
  }
  std::vector<float> final_rows(rows.size() * hidden);
  for (std::size_t r = 0; r < rows.size(); ++r)
    cpu::rms_norm(x.data() + rows[r] * hidden, weights_.final_norm.data(), hidden, c.rms_norm_eps,
                  final_rows.data() + r * hidden);
  std::vector<float> logits(rows.size() * std::size_t(c.vocab_size));
  cpu::matmul(final_rows.data(), rows.size(), weights_.lm_head, logits.data(), &pool_);
  return logits;
}

void reference_model::attention_block(std::size_t layer_idx, std::span<const forward_segment> segments,
                                      std::vector<float>& x) {
  const model_config& c = config_;
  const layer_weights& layer = weights_.layers[layer_idx];
  const attention_weights& a = layer.attention;
  std::size_t hidden = std::size_t(c.hidden_size);
  std::size_t head_dim = std::size_t(c.head_dim);
  std::size_t num_heads = std::size_t(c.num_heads);
  std::size_t num_kv_heads = std::size_t(c.num_kv_heads);
  std::size_t q_dim = std::size_t(c.q_dim());
  std::size_t kv_dim = std::size_t(c.kv_dim());
  std::size_t num_tokens = x.size() / hidden;

  // Where each token lives: its cache and position.
  struct token_slot {
    kv_cache* cache;
    std::size_t position;
  };
  std::vector<token_slot> slots;
  slots.reserve(num_tokens);
  for (const forward_segment& seg : segments)
    for (std::size_t j = 0; j < seg.tokens.size(); ++j)
      slots.push_back({seg.cache, seg.cache->length() + j});

  std::vector<float> normed(num_tokens * hidden);
  for (std::size_t t = 0; t < num_tokens; ++t)
    cpu::rms_norm(x.data() + t * hidden, layer.input_norm.data(), hidden, c.rms_norm_eps,
                  normed.data() + t * hidden);
  std::vector<float> q(num_tokens * q_dim), k(num_tokens * kv_dim), v(num_tokens * kv_dim);
  linear(normed.data(), num_tokens, a.q, q.data(), &pool_);
  linear(normed.data(), num_tokens, a.k, k.data(), &pool_);
  linear(normed.data(), num_tokens, a.v, v.data(), &pool_);

  // Per-head norm (qwen3) and RoPE, then K and V into the cache.
  for (std::size_t t = 0; t < num_tokens; ++t) {
    const float* cs = rope_cos_sin_.data() + slots[t].position * head_dim;
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
    kv_cache& cache = *slots[t].cache;
    std::copy_n(kt, kv_dim, cache.keys_[layer_idx].data() + slots[t].position * kv_dim);
    std::copy_n(v.data() + t * kv_dim, kv_dim, cache.values_[layer_idx].data() + slots[t].position * kv_dim);
  }

  std::vector<float> attn(num_tokens * q_dim);
  float scale = 1.0f / std::sqrt(float(head_dim));
  pool_.parallel_for(num_tokens, [&](std::size_t begin, std::size_t end) {
    std::vector<float> scores;
    for (std::size_t t = begin; t < end; ++t) {
      const kv_cache& cache = *slots[t].cache;
      std::size_t num_positions = slots[t].position + 1;
      scores.resize(num_positions);
      cpu::attend(q.data() + t * q_dim, cache.keys_[layer_idx].data(), cache.values_[layer_idx].data(),
                  kv_dim, num_positions, num_heads, num_kv_heads, head_dim, scale, scores.data(),
                  attn.data() + t * q_dim);
    }
  });

  std::vector<float> out(num_tokens * hidden);
  linear(attn.data(), num_tokens, a.o, out.data(), &pool_);
  for (std::size_t i = 0; i < x.size(); ++i)
    x[i] += out[i];
}

void reference_model::mlp(const mlp_weights& w, const float* in, std::size_t num_rows, float* out,
                          cpu::thread_pool* pool) const {
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

void reference_model::moe_block(const layer_weights& layer, const std::vector<float>& normed,
                                std::size_t num_tokens, std::vector<float>& x) {
  const model_config& c = config_;
  std::size_t hidden = std::size_t(c.hidden_size);
  std::size_t num_experts = std::size_t(c.num_experts);
  std::size_t top_k = std::size_t(c.num_experts_per_tok);

  // Router: f32 softmax over all experts, then the top-k (ties to the lower index).
  std::vector<float> probs(num_tokens * num_experts);
  cpu::matmul(normed.data(), num_tokens, layer.router, probs.data(), &pool_);
  std::vector<routed_slot> routes(num_tokens * top_k);
  std::vector<std::vector<std::pair<std::size_t, std::size_t>>> expert_rows(num_experts);
  for (std::size_t t = 0; t < num_tokens; ++t) {
    float* p = probs.data() + t * num_experts;
    cpu::softmax(p, num_experts);
    routed_slot* r = routes.data() + t * top_k;
    std::vector<std::int32_t> order(num_experts);
    for (std::size_t e = 0; e < num_experts; ++e)
      order[e] = std::int32_t(e);
    std::partial_sort(order.begin(), order.begin() + std::ptrdiff_t(top_k), order.end(),
                      [&](std::int32_t a, std::int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float sum = 0.0f;
    for (std::size_t s = 0; s < top_k; ++s) {
      r[s] = {order[s], p[order[s]]};
      sum += r[s].weight;
    }
    if (c.norm_topk_prob)
      for (std::size_t s = 0; s < top_k; ++s)
        r[s].weight /= sum;
    // Combine order is by expert index, never by rank or arrival (DESIGN.md §4).
    std::sort(r, r + top_k, [](const routed_slot& a, const routed_slot& b) { return a.expert < b.expert; });
    for (std::size_t s = 0; s < top_k; ++s)
      expert_rows[std::size_t(r[s].expert)].push_back({t, s});
  }

  std::vector<std::size_t> active;
  for (std::size_t e = 0; e < num_experts; ++e)
    if (!expert_rows[e].empty())
      active.push_back(e);
  std::vector<float> expert_out(num_tokens * top_k * hidden);
  pool_.parallel_for(active.size(), [&](std::size_t begin, std::size_t end) {
    std::vector<float> in, out;
    for (std::size_t i = begin; i < end; ++i) {
      const auto& rows = expert_rows[active[i]];
      in.resize(rows.size() * hidden);
      out.resize(rows.size() * hidden);
      for (std::size_t r = 0; r < rows.size(); ++r)
        std::copy_n(normed.data() + rows[r].first * hidden, hidden, in.data() + r * hidden);
      mlp(layer.experts[active[i]], in.data(), rows.size(), out.data(), nullptr);
      for (std::size_t r = 0; r < rows.size(); ++r)
        std::copy_n(out.data() + r * hidden, hidden,
                    expert_out.data() + (rows[r].first * top_k + rows[r].second) * hidden);
    }
  });

  std::vector<float> shared, shared_gate;
  if (c.shared_expert_intermediate_size > 0) {
    shared.resize(num_tokens * hidden);
    shared_gate.resize(num_tokens);
    mlp(layer.shared_expert, normed.data(), num_tokens, shared.data(), &pool_);
    cpu::matmul(normed.data(), num_tokens, layer.shared_expert_gate, shared_gate.data(), &pool_);
  }

  std::vector<float> combined(hidden);
  for (std::size_t t = 0; t < num_tokens; ++t) {
    std::fill(combined.begin(), combined.end(), 0.0f);
    for (std::size_t s = 0; s < top_k; ++s) {
      float w = routes[t * top_k + s].weight;
      const float* y = expert_out.data() + (t * top_k + s) * hidden;
      for (std::size_t i = 0; i < hidden; ++i)
        combined[i] += y[i] * w;
    }
    if (!shared.empty()) {
      float g = 1.0f / (1.0f + std::exp(-shared_gate[t]));
      for (std::size_t i = 0; i < hidden; ++i)
        combined[i] += g * shared[t * hidden + i];
    }
    float* xt = x.data() + t * hidden;
    for (std::size_t i = 0; i < hidden; ++i)
      xt[i] += combined[i];
  }
}

// -- generation ---------------------------------------------------------------

result<std::vector<std::vector<std::int32_t>>> generate(reference_model& model,
                                                        std::span<const generation_request> requests,
                                                        decode_mode mode, generation_stats* stats) {
  const model_config& c = model.config();
  std::size_t vocab = std::size_t(c.vocab_size);
  std::vector<std::vector<std::int32_t>> produced(requests.size());
  for (std::size_t i = 0; i < requests.size(); ++i)
    if (requests[i].prompt.empty())
      return make_error(error_code::invalid_argument, "request " + std::to_string(i) + " has an empty prompt");

  std::vector<kv_cache> caches(requests.size(), kv_cache{c});
  std::vector<std::vector<std::int32_t>> inputs(requests.size());  // tokens to feed next step
  for (std::size_t i = 0; i < requests.size(); ++i)
    inputs[i] = requests[i].prompt;

  generation_stats local_stats;
  generation_stats& st = stats ? *stats : local_stats;
  st = {};
  for (;;) {
    std::vector<std::size_t> running;
    std::vector<forward_segment> segments;
    for (std::size_t i = 0; i < requests.size(); ++i) {
      if (produced[i].size() >= requests[i].max_new_tokens)
        continue;
      if (mode == decode_mode::full_recompute) {
        caches[i] = kv_cache{c};
        inputs[i] = requests[i].prompt;
        inputs[i].insert(inputs[i].end(), produced[i].begin(), produced[i].end());
      }
      running.push_back(i);
      segments.push_back({&caches[i], inputs[i]});
    }
    if (running.empty())
      return produced;
    bool first_step = st.prompt_tokens == 0;
    auto start = std::chrono::steady_clock::now();
    auto logits = model.forward(segments, logits_for::last_token);
    if (!logits)
      return logits.err();
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (first_step) {
      st.prefill_seconds += seconds;
      for (const auto& seg : segments)
        st.prompt_tokens += seg.tokens.size();
    } else {
      st.decode_seconds += seconds;
      st.decode_tokens += running.size();
    }
    for (std::size_t r = 0; r < running.size(); ++r) {
      std::size_t i = running[r];
      std::size_t position = requests[i].prompt.size() + produced[i].size();
      std::int32_t token = sample(std::span<const float>{logits->data() + r * vocab, vocab},
                                  requests[i].sampling, requests[i].request_id, position);
      produced[i].push_back(token);
      inputs[i] = {token};
    }
  }
}

}  // namespace moert::model
