#pragma once

// A fixed pool of worker threads for CPU kernels. Work is split into contiguous index
// ranges by a pure function of (num_tasks, num_threads), so a kernel that writes disjoint
// outputs per index gets the same bits for any thread count.
//
// Thread safety: parallel_for may be called from one thread at a time (the owning device
// thread); it blocks that thread until every range has run. Not reentrant.

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moert::cpu {

class thread_pool {
public:
  // `num_threads` counts the calling thread, so 1 means "run inline, no workers".
  explicit thread_pool(std::size_t num_threads);
  ~thread_pool();

  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  std::size_t num_threads() const { return workers_.size() + 1; }

  // Calls fn(begin, end) on disjoint ranges covering [0, num_tasks). Ranges are at most
  // one per thread; with fewer tasks than threads some threads stay idle.
  void parallel_for(std::size_t num_tasks,
                    const std::function<void(std::size_t, std::size_t)>& fn);

  // parallel_for calls that were spread over the workers (not run inline) so far. Any thread.
  std::uint64_t spread_jobs() const { return spread_jobs_.load(std::memory_order_relaxed); }

private:
  void worker_loop(std::size_t worker_idx);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  // Written before generation_ is bumped (release), read after it is seen (acquire).
  const std::function<void(std::size_t, std::size_t)>* job_ = nullptr;
  std::size_t job_tasks_ = 0;
  // Workers and the caller spin on these for a short while before they sleep on the
  // condition variables: a futex wake-up costs 10-80 µs here, and a decode step is hundreds
  // of parallel_for calls a few hundred µs apart.
  std::atomic<std::size_t> generation_{0};
  std::atomic<std::size_t> pending_{0};
  std::size_t sleepers_ = 0;  // workers waiting on wake_ (guarded by mutex_)
  // Written under mutex_ (so a sleeping worker's wait sees it), read by workers after each
  // wake-up without it: a job no longer takes the mutex just to learn that the pool runs on.
  std::atomic<bool> stopping_{false};
  std::atomic<std::uint64_t> spread_jobs_{0};
};

// Below this many multiply-adds (about 10 µs on one core) waking a worker costs more than it
// saves, so such work runs on the calling thread. The bits are the same either way.
inline constexpr std::size_t min_parallel_work = std::size_t{1} << 21;

// pool->parallel_for(num_tasks, fn) when `pool` is set and `work` (multiply-adds, roughly) is
// worth spreading; fn(0, num_tasks) on the calling thread otherwise.
void parallel_for_if_worth(thread_pool* pool, std::size_t work, std::size_t num_tasks,
                           const std::function<void(std::size_t, std::size_t)>& fn);

}  // namespace moert::cpu
