#include "core/rng.hpp"

namespace moert {

std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

float keyed_uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t counter) {
  std::uint64_t h = mix64(mix64(mix64(seed) ^ stream) ^ counter);
  return float(h >> 40) * 0x1.0p-24f;
}

}  // namespace moert
