#include <catch2/catch.hpp>

#include "gpu/cpu/ops.hpp"

#include <cmath>
#include <vector>

using namespace moert::cpu;

TEST_CASE("rms_norm matches its definition") {
  std::vector<float> x{1, 2, 3, 4}, w{1, 1, 2, 0.5f}, out(4);
  rms_norm(x.data(), w.data(), 4, 0.0f, out.data());
  float rms = std::sqrt((1 + 4 + 9 + 16) / 4.0f);
  CHECK(out[0] == Approx(1 / rms));
  CHECK(out[2] == Approx(2 * 3 / rms));
  CHECK(out[3] == Approx(0.5f * 4 / rms));
}

TEST_CASE("rotate-half RoPE pairs j with j + dim/2") {
  std::vector<float> x{1, 2, 3, 4};
  float cos[2] = {0.0f, 1.0f}, sin[2] = {1.0f, 0.0f};
  rope_rotate_half(x.data(), 4, cos, sin);
  CHECK(x == std::vector<float>{-3, 2, 1, 4});  // pair (0,2) rotated 90°, pair (1,3) unchanged
}

TEST_CASE("attention with one position returns its value; GQA maps heads to kv heads") {
  // 2 query heads share 1 kv head of dim 2.
  std::vector<float> q{1, 0, 0, 1}, k{0.5f, 0.5f}, v{3, -1}, scores(1), out(4);
  attend(q.data(), k.data(), v.data(), 2, 1, 2, 1, 2, 1.0f, scores.data(), out.data());
  CHECK(out == std::vector<float>{3, -1, 3, -1});
  // Two positions with equal scores average the values.
  std::vector<float> k2{1, 0, 1, 0}, v2{2, 0, 4, 2}, s2(2), o2(2);
  attend(q.data(), k2.data(), v2.data(), 2, 2, 1, 1, 2, 1.0f, s2.data(), o2.data());
  CHECK(o2[0] == Approx(3));
  CHECK(o2[1] == Approx(1));
}

TEST_CASE("silu_mul and softmax") {
  std::vector<float> g{0.0f, 1.0f}, u{5.0f, 2.0f}, out(2);
  silu_mul(g.data(), u.data(), 2, out.data());
  CHECK(out[0] == 0.0f);
  CHECK(out[1] == Approx(2.0f / (1.0f + std::exp(-1.0f))));
  std::vector<float> s{1000.0f, 1000.0f};
  softmax(s.data(), 2);
  CHECK(s[0] == 0.5f);
}
