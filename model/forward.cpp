#include "model/forward.hpp"

#include <algorithm>
#include <chrono>
#include <set>
#include <string>

namespace moert::model {

reference_model::reference_model(model_config config, model_weights weights, std::size_t num_threads)
    : reference_model(std::move(config), std::make_shared<const model_weights>(std::move(weights)), num_threads) {}

reference_model::reference_model(model_config config, std::shared_ptr<const model_weights> weights,
                                 std::size_t num_threads)
    : config_(std::move(config)), weights_(std::move(weights)), pool_(num_threads), rope_(config_) {}

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
  rope_.ensure(max_position);

  std::vector<token_slot> slots;
  std::vector<float> x(num_tokens * hidden);
  for (const forward_segment& seg : segments) {
    seg.cache->grow(seg.tokens.size());
    for (std::size_t j = 0; j < seg.tokens.size(); ++j) {
      std::copy_n(weights_->embedding.data() + std::size_t(seg.tokens[j]) * hidden, hidden,
                  x.data() + slots.size() * hidden);
      slots.push_back({seg.cache, seg.cache->length() + j});
    }
  }
  for (std::size_t l = 0; l < std::size_t(c.num_layers); ++l) {
    attention_step(c, *weights_, rope_, l, slots, x.data(), &pool_);
    moe_block(l, x);
  }
  for (const forward_segment& seg : segments)
    seg.cache->advance(seg.tokens.size());

  std::vector<float> rows;
  std::size_t first = 0;
  for (const forward_segment& seg : segments) {
    std::size_t begin = which == logits_for::last_token ? seg.tokens.size() - 1 : 0;
    for (std::size_t j = begin; j < seg.tokens.size(); ++j)
      rows.insert(rows.end(), x.begin() + std::ptrdiff_t((first + j) * hidden),
                  x.begin() + std::ptrdiff_t((first + j + 1) * hidden));
    first += seg.tokens.size();
  }
  std::size_t num_rows = rows.size() / hidden;
  std::vector<float> logits(num_rows * std::size_t(c.vocab_size));
  logits_step(c, *weights_, rows.data(), num_rows, logits.data(), &pool_);
  return logits;
}

void reference_model::moe_block(std::size_t layer, std::vector<float>& x) {
  const model_config& c = config_;
  std::size_t hidden = std::size_t(c.hidden_size);
  std::size_t num_tokens = x.size() / hidden;
  bool sparse = c.sparse_layers[layer];
  std::size_t top_k = sparse ? std::size_t(c.num_experts_per_tok) : 0;

  std::vector<float> normed(num_tokens * hidden);
  std::vector<routed_slot> routes(num_tokens * top_k);
  route_step(c, *weights_, layer, x.data(), num_tokens, normed.data(), routes.data(), &pool_);

  // Each active expert runs once on all its rows; outputs land in their (token, slot) place.
  std::vector<float> weighted(num_tokens * top_k * hidden);
  std::vector<std::vector<std::size_t>> expert_slots(sparse ? std::size_t(c.num_experts) : 0);
  for (std::size_t i = 0; i < routes.size(); ++i)
    expert_slots[std::size_t(routes[i].expert)].push_back(i);
  std::vector<std::size_t> active;
  for (std::size_t e = 0; e < expert_slots.size(); ++e)
    if (!expert_slots[e].empty())
      active.push_back(e);
  std::size_t work = routes.size() * 3 * hidden * std::size_t(c.moe_intermediate_size);
  cpu::parallel_for_if_worth(&pool_, work, active.size(), [&](std::size_t begin, std::size_t end) {
    std::vector<float> in, out;
    for (std::size_t a = begin; a < end; ++a) {
      const auto& slots = expert_slots[active[a]];
      in.resize(slots.size() * hidden);
      out.resize(slots.size() * hidden);
      for (std::size_t r = 0; r < slots.size(); ++r)
        std::copy_n(normed.data() + (slots[r] / top_k) * hidden, hidden, in.data() + r * hidden);
      expert_step(*weights_, layer, active[a], in.data(), slots.size(), out.data(), nullptr);
      for (std::size_t r = 0; r < slots.size(); ++r)
        weight_row(out.data() + r * hidden, routes[slots[r]].weight, hidden,
                   weighted.data() + slots[r] * hidden);
    }
  });

  std::vector<float> side;
  if (has_side_ffn(c, layer)) {
    side.resize(num_tokens * hidden);
    side_ffn_step(c, *weights_, layer, normed.data(), num_tokens, side.data(), &pool_);
  }
  std::vector<const float*> weighted_rows(routes.size());
  for (std::size_t i = 0; i < routes.size(); ++i)
    weighted_rows[i] = weighted.data() + i * hidden;
  combine_step(hidden, top_k, weighted_rows.data(), side.empty() ? nullptr : side.data(), num_tokens, x.data());
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
