#include "model/forward.hpp"

#include "gpu/registry.hpp"
#include "gpu/work_units.hpp"

#include <algorithm>
#include <chrono>
#include <set>
#include <string>

namespace moert::model {

reference_model::reference_model(model_config config, model_weights weights, std::size_t num_threads)
    : reference_model(std::move(config), std::make_shared<const model_weights>(std::move(weights)), num_threads) {}

reference_model::reference_model(model_config config, std::shared_ptr<const model_weights> weights,
                                 std::size_t num_threads)
    : reference_model(std::move(config), std::move(weights),
                      gpu::create_backend(gpu::backend_kind::cpu, gpu::backend_options::with_threads(num_threads)).value()) {
  num_threads_ = num_threads;
}

reference_model::reference_model(model_config config, std::shared_ptr<const model_weights> weights,
                                 std::unique_ptr<gpu::backend> backend)
    : config_(std::move(config)), weights_(std::move(weights)), backend_(std::move(backend)), rope_(config_) {}

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
    if (!backend_->shares_memory_with(seg.cache->backend()))
      return make_error(error_code::invalid_argument, "sequence " + std::to_string(s) + "'s cache lives on " +
                                                          seg.cache->backend().name() + ", not on " +
                                                          backend_->name());
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

  gpu::backend& b = *backend_;
  std::vector<token_slot> slots;
  std::vector<std::int32_t> ids;
  for (const forward_segment& seg : segments) {
    seg.cache->grow(seg.tokens.size());
    for (std::size_t j = 0; j < seg.tokens.size(); ++j) {
      ids.push_back(seg.tokens[j]);
      slots.push_back({seg.cache, seg.cache->length() + j});
    }
  }
  gpu::buffer x = b.allocate(num_tokens * hidden * sizeof(float));
  embed_step(c, *weights_, ids, x.floats(), b);
  for (std::size_t l = 0; l < std::size_t(c.num_layers); ++l) {
    attention_step(c, *weights_, rope_, l, slots, x.floats(), b);
    moe_block(l, x.floats(), num_tokens);
  }
  for (const forward_segment& seg : segments)
    seg.cache->advance(seg.tokens.size());

  std::vector<const float*> rows;
  std::size_t first = 0;
  for (const forward_segment& seg : segments) {
    std::size_t begin = which == logits_for::last_token ? seg.tokens.size() - 1 : 0;
    for (std::size_t j = begin; j < seg.tokens.size(); ++j)
      rows.push_back(x.floats() + (first + j) * hidden);
    first += seg.tokens.size();
  }
  std::size_t num_rows = rows.size();
  std::size_t vocab = std::size_t(c.vocab_size);
  gpu::buffer last = b.allocate(num_rows * hidden * sizeof(float));
  b.gather_rows(rows.data(), num_rows, hidden, last.floats());
  std::vector<float> logits(num_rows * vocab);
  if (b.shares_memory_with(gpu::host_backend())) {  // host memory: straight into the result
    logits_step(c, *weights_, last.floats(), num_rows, logits.data(), b);
  } else {
    gpu::buffer on_device = b.allocate(logits.size() * sizeof(float));
    logits_step(c, *weights_, last.floats(), num_rows, on_device.floats(), b);
    b.download(logits.data(), on_device.data(), logits.size() * sizeof(float));
  }
  return logits;
}

void reference_model::moe_block(std::size_t layer, float* x, std::size_t num_tokens) {
  const model_config& c = config_;
  gpu::backend& b = *backend_;
  std::size_t hidden = std::size_t(c.hidden_size);
  bool sparse = c.sparse_layers[layer];
  std::size_t top_k = sparse ? std::size_t(c.num_experts_per_tok) : 0;

  gpu::buffer normed = b.allocate(num_tokens * hidden * sizeof(float));
  std::vector<routed_slot> routes(num_tokens * top_k);
  route_step(c, *weights_, layer, x, num_tokens, normed.floats(), routes.data(), b);

  // Each active expert runs once on all its rows; outputs land in their (token, slot) place.
  gpu::buffer weighted = b.allocate(num_tokens * top_k * hidden * sizeof(float));
  std::vector<std::vector<std::size_t>> expert_slots(sparse ? std::size_t(c.num_experts) : 0);
  for (std::size_t i = 0; i < routes.size(); ++i)
    expert_slots[std::size_t(routes[i].expert)].push_back(i);
  std::vector<std::size_t> active;
  for (std::size_t e = 0; e < expert_slots.size(); ++e)
    if (!expert_slots[e].empty())
      active.push_back(e);
  std::size_t work = routes.size() * 3 * hidden * std::size_t(c.moe_intermediate_size);
  // Lanes take whole experts, split by work, not by count: the tasks are cost units, each
  // expert as many as its rows plus the cost of streaming its weights (gpu/work_units.hpp),
  // and a lane runs the experts whose first unit falls in its range. A prefill's experts hold
  // very different numbers of rows; by count one lane could get most of them. Which lane runs
  // an expert never changes its bits.
  std::vector<std::size_t> first_unit(active.size() + 1, 0);
  for (std::size_t a = 0; a < active.size(); ++a)
    first_unit[a + 1] = first_unit[a] + expert_slots[active[a]].size() + gpu::weight_stream_rows;
  auto expert_at = [&](std::size_t unit) {  // the first expert whose first unit is ≥ unit
    return std::size_t(std::lower_bound(first_unit.begin(), first_unit.end() - 1, unit) - first_unit.begin());
  };
  b.concurrent(first_unit.back(), work, [&](gpu::backend& lane, std::size_t unit_begin, std::size_t unit_end) {
    const std::size_t begin = expert_at(unit_begin), end = expert_at(unit_end);
    std::size_t max_rows = 0;
    for (std::size_t a = begin; a < end; ++a)
      max_rows = std::max(max_rows, expert_slots[active[a]].size());
    gpu::buffer in = lane.allocate(max_rows * hidden * sizeof(float));
    gpu::buffer out = lane.allocate(max_rows * hidden * sizeof(float));
    std::vector<const float*> sources;
    std::vector<float*> destinations;
    std::vector<float> weights;
    for (std::size_t a = begin; a < end; ++a) {
      const auto& slots = expert_slots[active[a]];
      sources.clear();
      destinations.clear();
      weights.clear();
      for (std::size_t slot : slots) {
        sources.push_back(normed.floats() + (slot / top_k) * hidden);
        destinations.push_back(weighted.floats() + slot * hidden);
        weights.push_back(routes[slot].weight);
      }
      lane.gather_rows(sources.data(), slots.size(), hidden, in.floats());
      expert_step(*weights_, layer, active[a], in.floats(), slots.size(), out.floats(), lane);
      lane.weight_rows(out.floats(), slots.size(), hidden, weights.data(), destinations.data());
    }
  });

  gpu::buffer side;
  if (has_side_ffn(c, layer)) {
    side = b.allocate(num_tokens * hidden * sizeof(float));
    side_ffn_step(c, *weights_, layer, normed.floats(), num_tokens, side.floats(), b);
  }
  std::vector<const float*> weighted_rows(routes.size());
  for (std::size_t i = 0; i < routes.size(); ++i)
    weighted_rows[i] = weighted.floats() + i * hidden;
  combine_step(hidden, top_k, weighted_rows.data(), side.empty() ? nullptr : side.floats(), num_tokens, x, b);
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

  std::vector<kv_cache> caches(requests.size(), kv_cache{c, model.backend()});
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
        caches[i] = kv_cache{c, model.backend()};
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
