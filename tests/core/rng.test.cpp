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
