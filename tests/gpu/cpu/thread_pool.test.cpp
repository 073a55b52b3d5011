#include <catch2/catch.hpp>

#include "gpu/cpu/thread_pool.hpp"

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace moert::cpu {

// Workers spin a while for the next job, then sleep: jobs that come back to back and jobs
// that come after a pause (workers asleep) must both cover every index exactly once.
TEST_CASE("parallel_for runs every index once, whether the workers spin or sleep", "[thread_pool]") {
  for (std::size_t threads : {2, 3}) {
    thread_pool pool{threads};
    std::vector<std::atomic<int>> hits(97);
    std::size_t expected_spread = 0;
    for (int round = 0; round < 400; ++round) {
      if (round % 50 == 0)
        std::this_thread::sleep_for(std::chrono::milliseconds{2});  // past the spin: workers sleep
      std::size_t tasks = 1 + std::size_t(round) % hits.size();
      expected_spread += tasks > 1 ? 1 : 0;
      pool.parallel_for(tasks, [&](std::size_t begin, std::size_t end) {
        for (std::size_t i = begin; i < end; ++i)
          hits[i].fetch_add(1, std::memory_order_relaxed);
      });
    }
    std::vector<int> want(hits.size(), 0);
    for (int round = 0; round < 400; ++round)
      for (std::size_t i = 0; i < 1 + std::size_t(round) % hits.size(); ++i)
        ++want[i];
    for (std::size_t i = 0; i < hits.size(); ++i)
      REQUIRE(hits[i].load() == want[i]);
    CHECK(pool.spread_jobs() == expected_spread);
  }
}

TEST_CASE("a pool is destroyed cleanly with its workers spinning or asleep", "[thread_pool]") {
  for (int pause_us : {0, 50, 3000}) {
    thread_pool pool{2};
    std::atomic<int> sum{0};
    pool.parallel_for(8, [&](std::size_t b, std::size_t e) { sum.fetch_add(int(e - b)); });
    std::this_thread::sleep_for(std::chrono::microseconds{pause_us});
    CHECK(sum.load() == 8);
  }  // the destructor joins; a lost wake-up would hang here (ctest's timeout catches it)
}

}  // namespace moert::cpu
