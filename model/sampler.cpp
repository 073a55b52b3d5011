#include "model/sampler.hpp"

#include "core/rng.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace moert::model {

std::int32_t argmax(std::span<const float> logits) {
  std::size_t best = 0;
  for (std::size_t i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[best])
      best = i;
  return std::int32_t(best);
}

std::int32_t sample(std::span<const float> logits, const sampling_params& params,
                    std::uint64_t request_id, std::uint64_t position) {
  if (params.greedy() || logits.size() == 1)
    return argmax(logits);

  // Candidates by descending logit, ties to the lower id, so the cut-offs are well defined.
  std::vector<std::int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  std::size_t keep = logits.size();
  if (params.top_k > 0)
    keep = std::min(keep, std::size_t(params.top_k));
  auto by_logit = [&](std::int32_t a, std::int32_t b) {
    return logits[std::size_t(a)] > logits[std::size_t(b)] ||
           (logits[std::size_t(a)] == logits[std::size_t(b)] && a < b);
  };
  std::partial_sort(order.begin(), order.begin() + std::ptrdiff_t(keep), order.end(), by_logit);
  order.resize(keep);

  // Probabilities in double: the top-p cut and the draw stay stable for near-equal weights.
  std::vector<double> probs(keep);
  double max_logit = logits[std::size_t(order[0])];
  double total = 0.0;
  for (std::size_t i = 0; i < keep; ++i) {
    probs[i] = std::exp((double(logits[std::size_t(order[i])]) - max_logit) / params.temperature);
    total += probs[i];
  }
  if (params.top_p < 1.0f) {
    double mass = 0.0;
    std::size_t cut = keep;
    for (std::size_t i = 0; i < keep; ++i) {
      mass += probs[i] / total;
      if (mass >= double(params.top_p)) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    total = std::accumulate(probs.begin(), probs.begin() + std::ptrdiff_t(keep), 0.0);
  }

  double target = double(keyed_uniform(params.seed, request_id, position)) * total;
  double running = 0.0;
  for (std::size_t i = 0; i < keep; ++i) {
    running += probs[i];
    if (target < running)
      return order[i];
  }
  return order[keep - 1];
}

}  // namespace moert::model
