#pragma once

// Token selection from logits. Randomness is keyed by (seed, request id, position) through
// core/rng.hpp, so the token drawn for a request never depends on what it was batched with,
// on threads, or on how many draws other requests made.
//
// Thread safety: pure functions.

#include <cstdint>
#include <span>

namespace moert::model {

struct sampling_params {
  float temperature = 0.0f;  // 0 = greedy (argmax)
  std::int32_t top_k = 0;    // 0 = no top-k cut
  float top_p = 1.0f;        // 1 = no nucleus cut
  std::uint64_t seed = 0;

  bool greedy() const { return temperature <= 0.0f; }
};

// Index of the largest logit; the lowest index wins a tie.
std::int32_t argmax(std::span<const float> logits);

// Samples (or takes the argmax when params.greedy()). `position` is the index in the
// sequence of the token being produced.
std::int32_t sample(std::span<const float> logits, const sampling_params& params,
                    std::uint64_t request_id, std::uint64_t position);

}  // namespace moert::model
