#include <catch2/catch.hpp>

#include "core/rng.hpp"

using namespace moert;

TEST_CASE("keyed draws depend only on their key") {
  float a = keyed_uniform(1, 2, 3);
  CHECK(a == keyed_uniform(1, 2, 3));
  CHECK(a != keyed_uniform(1, 2, 4));
  CHECK(a != keyed_uniform(1, 3, 3));
  CHECK(a != keyed_uniform(2, 2, 3));
  double sum = 0;
  for (std::uint64_t i = 0; i < 10000; ++i) {
    float u = keyed_uniform(9, 0, i);
    REQUIRE(u >= 0.0f);
    REQUIRE(u < 1.0f);
    sum += u;
  }
  CHECK(sum / 10000 == Approx(0.5).margin(0.02));
}

TEST_CASE("the generator is reproducible from its seed") {
  rng a{5}, b{5}, c{6};
  CHECK(a.next_u64() == b.next_u64());
  CHECK(a.next_u64() != c.next_u64());
}

TEST_CASE("unmix64 inverts mix64, and a re-keyed seed draws another stream's numbers") {
  rng gen{3};
  for (int i = 0; i < 1000; ++i) {
    std::uint64_t x = gen.next_u64();
    REQUIRE(unmix64(mix64(x)) == x);
  }
  CHECK(unmix64(mix64(0)) == 0);
  for (std::uint64_t actual : {1ull, 17ull, 123456789ull}) {
    std::uint64_t seed = rekey_seed(42, 0, actual);
    for (std::uint64_t c = 0; c < 100; ++c)
      REQUIRE(keyed_uniform(seed, actual, c) == keyed_uniform(42, 0, c));
  }
  CHECK(rekey_seed(42, 0, 1) != rekey_seed(42, 0, 2));
}
