#include "core/rng.hpp"

namespace moert {

std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

namespace {

// The multiplicative inverse of an odd number modulo 2^64 (Newton: each step doubles the
// correct low bits, 3 -> 6 -> ... -> 96).
constexpr std::uint64_t inverse_odd(std::uint64_t a) {
  std::uint64_t x = a;  // correct to 3 bits for odd a
  for (int i = 0; i < 5; ++i)
    x *= 2 - a * x;
  return x;
}

// Undoes x ^= x >> shift.
constexpr std::uint64_t unxorshift(std::uint64_t y, unsigned shift) {
  std::uint64_t x = y;
  for (unsigned s = shift; s < 64; s += shift)
    x = y ^ (x >> shift);
  return x;
}

}  // namespace

std::uint64_t unmix64(std::uint64_t x) {
  x = unxorshift(x, 31);
  x *= inverse_odd(0x94d049bb133111ebull);
  x = unxorshift(x, 27);
  x *= inverse_odd(0xbf58476d1ce4e5b9ull);
  x = unxorshift(x, 30);
  return x - 0x9e3779b97f4a7c15ull;
}

std::uint64_t rekey_seed(std::uint64_t seed, std::uint64_t wanted, std::uint64_t actual) {
  // keyed_uniform hashes mix64(seed) ^ stream first: pick the seed whose mix cancels the change.
  return unmix64(mix64(seed) ^ wanted ^ actual);
}

float keyed_uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t counter) {
  std::uint64_t h = mix64(mix64(mix64(seed) ^ stream) ^ counter);
  return float(h >> 40) * 0x1.0p-24f;
}

}  // namespace moert
