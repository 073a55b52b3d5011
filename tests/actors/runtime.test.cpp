// The run's statistics stay bounded however long the run (issue [E]: they used to keep every
// expert batch size and every (layer, shard, step) forever) and still give the report's
// figures: the same ones a naive record of everything gives.
#include <catch2/catch.hpp>

#include "actors/runtime.hpp"
#include "core/rng.hpp"

#include <algorithm>
#include <map>
#include <tuple>
#include <vector>

using namespace moert;
using namespace moert::actors;

namespace {

struct naive_stats {
  std::vector<std::size_t> sizes;
  std::map<std::tuple<std::uint32_t, std::uint32_t, std::uint64_t>, std::size_t> executions;

  double p(std::size_t percent) {
    std::sort(sizes.begin(), sizes.end());
    std::size_t rank = percent == 50 ? sizes.size() / 2 : std::min(sizes.size() - 1, sizes.size() * percent / 100);
    return double(sizes[rank]);
  }
  double per_wave() const {
    double total = 0;
    for (const auto& [key, n] : executions)
      total += double(n);
    return total / double(executions.size());
  }
};

}  // namespace

TEST_CASE("runtime_stats: a long run keeps bounded state and the report's exact figures") {
  runtime_stats stats;
  naive_stats naive;
  rng gen{17};
  const std::uint32_t layers = 4, shards = 3;
  std::vector<std::uint64_t> step(shards, 0);
  std::size_t max_remembered = 0;
  for (int i = 0; i < 200000; ++i) {
    std::uint32_t shard = std::uint32_t(gen.next_u64() % shards);
    if (gen.next_u64() % 16 == 0)
      ++step[shard];  // the shard moved on to its next step
    // Now and then a slower expert device still records a batch of the step before.
    std::uint64_t s = step[shard] > 0 && gen.next_u64() % 10 == 0 ? step[shard] - 1 : step[shard];
    std::uint32_t layer = std::uint32_t(gen.next_u64() % layers);
    std::size_t tokens = 1 + gen.next_u64() % 300;
    std::vector<std::tuple<std::uint32_t, std::uint64_t>> waves{{shard, s}};
    if (gen.next_u64() % 4 == 0) {  // a batch mixing two shards' rows (and a duplicate)
      std::uint32_t other = (shard + 1) % shards;
      waves.push_back({other, step[other]});
      waves.push_back({shard, s});
    }
    stats.record_expert_batch(layer, tokens, waves);
    naive.sizes.push_back(tokens);
    std::vector<std::tuple<std::uint32_t, std::uint64_t>> distinct = waves;
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    for (const auto& [sh, st] : distinct)
      ++naive.executions[{layer, sh, st}];
    max_remembered = std::max(max_remembered, stats.remembered_waves());
  }
  CHECK(max_remembered <= 8 * layers * shards);  // the naive record holds tens of thousands
  CHECK(naive.executions.size() > 10000);

  auto summary = stats.expert_batches();
  CHECK(summary.count == naive.sizes.size());
  double sum = 0;
  for (auto s : naive.sizes)
    sum += double(s);
  CHECK(summary.mean == Approx(sum / double(naive.sizes.size())).epsilon(1e-12));
  CHECK(summary.p50 == naive.p(50));  // exact below 1024 tokens
  CHECK(summary.p95 == naive.p(95));
  CHECK(stats.executions_per_layer_wave() == Approx(naive.per_wave()).epsilon(1e-12));
}

TEST_CASE("size_histogram: exact below its limit, within 1/64 above, fixed size") {
  size_histogram h;
  std::vector<std::size_t> values;
  rng gen{3};
  for (int i = 0; i < 50000; ++i) {
    std::size_t v = gen.next_u64() % 2 ? gen.next_u64() % 1024 : 1024 + gen.next_u64() % 1000000;
    h.add(v);
    values.push_back(v);
  }
  std::sort(values.begin(), values.end());
  for (std::uint64_t rank : {0ull, 100ull, 24999ull, 25000ull, 40000ull, 49999ull}) {
    INFO("rank " << rank);
    double want = double(values[rank]);
    double got = h.at_rank(rank);
    if (want < 1024)
      CHECK(got == want);
    else {
      CHECK(got <= want);
      CHECK(got >= want * (1.0 - 1.0 / 64.0));
    }
  }
  h.add(std::size_t(-1));  // the largest value lands in the last bucket, no overflow
  CHECK(h.count() == 50001);
  CHECK(h.at_rank(50000) > 1e18);
}
