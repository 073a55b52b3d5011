#include <catch2/catch.hpp>

#include "model/sampler.hpp"

#include <map>
#include <vector>

using namespace moert::model;

TEST_CASE("greedy takes the argmax, lowest index on ties") {
  std::vector<float> logits{0.1f, 2.0f, 2.0f, -1.0f};
  CHECK(argmax(logits) == 1);
  CHECK(sample(logits, {}, 0, 0) == 1);
}

TEST_CASE("sampling is a pure function of (seed, request, position)") {
  std::vector<float> logits{1.0f, 1.1f, 0.9f, 1.05f, 0.2f};
  sampling_params p{1.0f, 0, 1.0f, 42};
  std::map<std::int32_t, int> seen;
  for (std::uint64_t pos = 0; pos < 200; ++pos) {
    auto a = sample(logits, p, 7, pos);
    CHECK(a == sample(logits, p, 7, pos));
    ++seen[a];
  }
  CHECK(seen.size() >= 4);  // close logits: most tokens get drawn
  p.seed = 43;
  int differ = 0;
  for (std::uint64_t pos = 0; pos < 50; ++pos)
    differ += sample(logits, p, 7, pos) != sample(logits, {1.0f, 0, 1.0f, 42}, 7, pos);
  CHECK(differ > 10);
}

TEST_CASE("top-k and top-p restrict the candidates") {
  std::vector<float> logits{3.0f, 2.9f, 0.0f, -1.0f, 2.8f};
  for (std::uint64_t pos = 0; pos < 300; ++pos) {
    auto k2 = sample(logits, {5.0f, 2, 1.0f, 1}, 0, pos);
    CHECK((k2 == 0 || k2 == 1));
    // With a low temperature the top token holds > 50 % of the mass: top-p 0.5 keeps only it.
    CHECK(sample(logits, {0.05f, 0, 0.5f, 1}, 0, pos) == 0);
  }
}
