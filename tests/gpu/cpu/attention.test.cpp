// The cpu backend's attention split over (row, query head) tasks on its thread pool is bit
// for bit the serial loop of cpu::attend, for any thread count and context length, in one
// long-context decode row and in a batch of rows of different lengths (issue [P] part 4).
#include <catch2/catch.hpp>

#include "core/rng.hpp"
#include "gpu/cpu/backend.hpp"
#include "gpu/cpu/ops.hpp"

#include <vector>

using namespace moert;

namespace {

std::vector<float> random_floats(std::size_t n, rng& gen) {
  std::vector<float> v(n);
  for (float& x : v)
    x = gen.uniform(-1.0f, 1.0f);
  return v;
}

struct case_data {
  std::vector<float> q, keys, values;
  std::vector<std::size_t> lengths;
};

case_data make_case(const std::vector<std::size_t>& lengths, std::size_t q_dim, std::size_t kv_dim,
                    std::uint64_t seed) {
  rng gen{seed};
  case_data c;
  c.lengths = lengths;
  std::size_t most = 0;
  for (std::size_t n : lengths)
    most = std::max(most, n);
  c.q = random_floats(lengths.size() * q_dim, gen);
  c.keys = random_floats(most * kv_dim, gen);  // rows share one cache: each sees its prefix
  c.values = random_floats(most * kv_dim, gen);
  return c;
}

}  // namespace

TEST_CASE("GQA attention on 1-4 threads gives the serial loop's bits, decode and batched") {
  const std::size_t heads = 16, kv_heads = 4, head_dim = 64, q_dim = heads * head_dim, kv_dim = kv_heads * head_dim;
  const float scale = 0.125f;
  for (const std::vector<std::size_t>& lengths : std::vector<std::vector<std::size_t>>{
           {1}, {31}, {700}, {4096}, {5, 300, 1, 2000}, {64, 64, 64, 64, 64, 64, 64}}) {
    case_data c = make_case(lengths, q_dim, kv_dim, lengths.size() * 1000 + lengths.front());
    std::vector<float> serial(lengths.size() * q_dim);
    for (std::size_t t = 0; t < lengths.size(); ++t) {
      std::vector<float> scores(lengths[t]);
      cpu::attend(c.q.data() + t * q_dim, c.keys.data(), c.values.data(), kv_dim, lengths[t], heads, kv_heads, head_dim,
                  scale, scores.data(), serial.data() + t * q_dim);
    }
    std::vector<gpu::kv_rows> rows;
    for (std::size_t n : lengths)
      rows.push_back({c.keys.data(), c.values.data(), n});
    for (std::size_t threads : {1, 2, 3, 4}) {
      INFO(lengths.size() << " rows, first of " << lengths.front() << " positions, " << threads << " threads");
      cpu::cpu_backend backend{threads};
      std::vector<float> out(lengths.size() * q_dim, -1.0f);
      backend.attention(c.q.data(), rows, {heads, kv_heads, head_dim, kv_dim, scale}, out.data());
      CHECK(out == serial);
    }
  }
}

TEST_CASE("MLA attention on 1-4 threads gives the serial loop's bits") {
  const std::size_t heads = 8, key_dim = 96, value_dim = 64, stride = 96;
  const float scale = 0.1f;
  for (const std::vector<std::size_t>& lengths : std::vector<std::vector<std::size_t>>{{1}, {1500}, {3, 900, 40}}) {
    rng gen{lengths.front()};
    std::size_t most = 0;
    for (std::size_t n : lengths)
      most = std::max(most, n);
    auto q = random_floats(lengths.size() * heads * key_dim, gen);
    auto cache = random_floats(most * stride, gen);
    std::vector<float> serial(lengths.size() * heads * value_dim);
    for (std::size_t t = 0; t < lengths.size(); ++t) {
      std::vector<float> scores(lengths[t]);
      cpu::attend_shared_row(q.data() + t * heads * key_dim, cache.data(), stride, lengths[t], heads, key_dim,
                             value_dim, scale, scores.data(), serial.data() + t * heads * value_dim);
    }
    std::vector<gpu::kv_rows> rows;
    for (std::size_t n : lengths)
      rows.push_back({cache.data(), nullptr, n});
    for (std::size_t threads : {1, 2, 3, 4}) {
      INFO(lengths.size() << " rows, " << threads << " threads");
      cpu::cpu_backend backend{threads};
      std::vector<float> out(serial.size(), -1.0f);
      backend.mla_attention(q.data(), rows, {heads, key_dim, value_dim, stride, scale}, out.data());
      CHECK(out == serial);
    }
  }
}

namespace {

// attend()'s definition, one position at a time: each score a chain of product-then-add over
// d from +0.0f, softmax, then each output lane a chain over positions. The kernel interleaves
// positions and vectorizes lanes; this is what its bits must stay (this file is compiled with
// -ffp-contract=off, like the backend, so no product is fused into its add here either).
void attend_by_definition(const float* q, const float* keys, const float* values, std::size_t stride,
                          std::size_t positions, std::size_t heads, std::size_t kv_heads, std::size_t dim,
                          float scale, float* out) {
  std::vector<float> scores(positions);
  for (std::size_t h = 0; h < heads; ++h) {
    const std::size_t kv = (h / (heads / kv_heads)) * dim;
    for (std::size_t p = 0; p < positions; ++p) {
      float dot = 0.0f;
      for (std::size_t d = 0; d < dim; ++d)
        dot += q[h * dim + d] * keys[p * stride + kv + d];
      scores[p] = dot * scale;
    }
    cpu::softmax(scores.data(), positions);
    for (std::size_t d = 0; d < dim; ++d) {
      float acc = 0.0f;
      for (std::size_t p = 0; p < positions; ++p)
        acc += scores[p] * values[p * stride + kv + d];
      out[h * dim + d] = acc;
    }
  }
}

}  // namespace

TEST_CASE("attend gives the bits of its position-by-position definition, any length and head size") {
  // 36 and 50 are not multiples of the kernel's lanes: its scalar tails run too.
  for (std::size_t head_dim : {64, 36, 50})
  for (std::size_t positions : {1, 7, 8, 9, 16, 23, 130}) {
    const std::size_t heads = 4, kv_heads = 2, q_dim = heads * head_dim, kv_dim = kv_heads * head_dim;
    const float scale = 0.125f;
    INFO(positions << " positions, head_dim " << head_dim);
    case_data c = make_case({positions}, q_dim, kv_dim, 77 + positions);
    std::vector<float> expected(q_dim), out(q_dim, -1.0f), scores(positions);
    attend_by_definition(c.q.data(), c.keys.data(), c.values.data(), kv_dim, positions, heads, kv_heads, head_dim,
                         scale, expected.data());
    cpu::attend(c.q.data(), c.keys.data(), c.values.data(), kv_dim, positions, heads, kv_heads, head_dim, scale,
                scores.data(), out.data());
    CHECK(out == expected);
  }
}
