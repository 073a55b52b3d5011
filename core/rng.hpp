#pragma once

// Counter-based randomness. Every draw is a pure function of its key, so a sampled token
// depends on (seed, request, position) only, never on batching, threads or call order.

#include <cstddef>
#include <cstdint>

namespace moert {

// SplitMix64 finaliser: a bijective 64-bit mix with good avalanche.
std::uint64_t mix64(std::uint64_t x);

// The inverse of mix64: unmix64(mix64(x)) == x.
std::uint64_t unmix64(std::uint64_t x);

// A uniform float in [0, 1) keyed by (seed, stream, counter), 24 random bits.
float keyed_uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t counter);

// The seed that makes stream `actual` draw what stream `wanted` draws under `seed`:
// keyed_uniform(rekey_seed(seed, wanted, actual), actual, c) == keyed_uniform(seed, wanted, c)
// for every counter c. The server keys a seeded request's draws by its seed alone while the
// engine keys them by request id (ids must be unique, so they follow arrival order).
std::uint64_t rekey_seed(std::uint64_t seed, std::uint64_t wanted, std::uint64_t actual);

// A small deterministic generator for synthetic weights and tests. Not thread-safe.
class rng {
public:
  explicit rng(std::uint64_t seed) : state_(seed) {}

  std::uint64_t next_u64() { return mix64(state_ += 0x9e3779b97f4a7c15ull); }
  // Uniform in [0, 1).
  float uniform() { return float(next_u64() >> 40) * 0x1.0p-24f; }
  // Uniform in [lo, hi).
  float uniform(float lo, float hi) { return lo + (hi - lo) * uniform(); }
  // An integer in [lo, hi] (modulo bias is negligible for the small ranges tests draw).
  std::size_t uniform_int(std::size_t lo, std::size_t hi) {
    return lo + std::size_t(next_u64() % std::uint64_t(hi - lo + 1));
  }

private:
  std::uint64_t state_;
};

}  // namespace moert
