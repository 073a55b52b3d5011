#include "policy/defrag.hpp"

namespace moert::policy {

std::string_view to_string(queue_policy policy) {
  switch (policy) {
    case queue_policy::defrag:
      return "defrag";
    case queue_policy::mtfs:
      return "mtfs";
    case queue_policy::flfs:
      return "flfs";
  }
  return "?";
}

std::optional<queue_policy> parse_queue_policy(std::string_view name) {
  for (auto policy : {queue_policy::defrag, queue_policy::mtfs, queue_policy::flfs})
    if (name == to_string(policy))
      return policy;
  if (name == "MTFS")
    return queue_policy::mtfs;
  if (name == "FLFS")
    return queue_policy::flfs;
  return std::nullopt;
}

double lookahead_score(const queue_matrix& queues, std::size_t layer, const defrag_params& params) {
  std::size_t num_layers = queues.num_layers();
  double score = 0.0;
  double decay = 1.0;
  for (std::size_t k = 1; k <= params.lookahead; ++k) {
    decay *= params.delta;
    std::size_t next = (layer + k) % num_layers;
    score += decay * double(queues.layer_tokens(next)) / double(queues.num_experts());
  }
  return score;
}

std::optional<queue_choice> pick_queue(const queue_matrix& queues, queue_policy policy,
                                       const defrag_params& params, std::chrono::nanoseconds now) {
  std::optional<queue_choice> best;
  double best_score = 0.0;
  // Strict comparisons in (layer, expert) order keep the lowest index on ties.
  auto offer = [&](std::size_t b, std::size_t e, double score, bool urgent) {
    if (!best || score > best_score) {
      best = queue_choice{b, e, urgent};
      best_score = score;
    }
  };

  if (params.max_wait.count() > 0) {
    for (std::size_t b = 0; b < queues.num_layers(); ++b)
      for (std::size_t e = 0; e < queues.num_experts(); ++e)
        if (queues.tokens(b, e) > 0 && now - queues.oldest(b, e) > params.max_wait)
          offer(b, e, -double(queues.oldest(b, e).count()), true);  // oldest first
    if (best)
      return best;
  }

  auto own = [&](std::size_t b, std::size_t e) {
    return policy == queue_policy::flfs ? 0.0 : double(queues.tokens(b, e));
  };
  auto layer_bonus = [&](std::size_t b) {
    if (policy == queue_policy::defrag)
      return lookahead_score(queues, b, params);
    return policy == queue_policy::flfs ? -double(b) : 0.0;
  };
  if (params.oldest_first) {
    std::chrono::nanoseconds best_age{};
    for (std::size_t b = 0; b < queues.num_layers(); ++b) {
      if (queues.layer_tokens(b) == 0)
        continue;
      double bonus = layer_bonus(b);
      for (std::size_t e = 0; e < queues.num_experts(); ++e) {
        if (queues.tokens(b, e) == 0)
          continue;
        auto age = queues.oldest(b, e);
        double score = bonus + own(b, e);
        if (!best || age < best_age || (age == best_age && score > best_score)) {
          best = queue_choice{b, e, false};
          best_age = age;
          best_score = score;
        }
      }
    }
    return best;
  }
  for (std::size_t b = 0; b < queues.num_layers(); ++b) {
    if (queues.layer_tokens(b) == 0)
      continue;
    double bonus = layer_bonus(b);
    for (std::size_t e = 0; e < queues.num_experts(); ++e)
      if (queues.tokens(b, e) > 0)
        offer(b, e, bonus + own(b, e), false);
  }
  if (!best || !params.oldest_first_within_layer)
    return best;
  // Same layer, so the same layer bonus: the oldest first, then the policy's own score, then
  // the lowest index.
  std::size_t b = best->layer;
  for (std::size_t e = 0; e < queues.num_experts(); ++e) {
    if (queues.tokens(b, e) == 0 || e == best->expert)
      continue;
    auto age = queues.oldest(b, e), best_age = queues.oldest(b, best->expert);
    if (age < best_age || (age == best_age && own(b, e) > own(b, best->expert)) ||
        (age == best_age && own(b, e) == own(b, best->expert) && e < best->expert))
      best->expert = e;
  }
  return best;
}

}  // namespace moert::policy
