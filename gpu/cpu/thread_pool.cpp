#include "gpu/cpu/thread_pool.hpp"

#include <chrono>

namespace moert::cpu {

namespace {

// Range of thread `idx` when `num_tasks` are split over `num_threads`.
std::pair<std::size_t, std::size_t> range_of(std::size_t idx, std::size_t num_tasks,
                                             std::size_t num_threads) {
  std::size_t base = num_tasks / num_threads;
  std::size_t extra = num_tasks % num_threads;
  std::size_t begin = idx * base + (idx < extra ? idx : extra);
  return {begin, begin + base + (idx < extra ? 1 : 0)};
}

}  // namespace

thread_pool::thread_pool(std::size_t num_threads) {
  if (num_threads == 0)
    num_threads = 1;
  for (std::size_t i = 1; i < num_threads; ++i)
    workers_.emplace_back([this, i] { worker_loop(i); });
}

thread_pool::~thread_pool() {
  {
    std::lock_guard<std::mutex> guard{mutex_};
    stopping_.store(true, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_release);  // a spinning worker looks, then sees stopping_
  }
  wake_.notify_all();
  for (auto& worker : workers_)
    worker.join();
}

namespace {

// How long a thread spins for the next job (or the last worker) before it sleeps: longer than
// the serial gaps between a step's kernels, short enough that an idle pool costs little.
constexpr auto spin_limit = std::chrono::microseconds{100};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until done() or spin_limit; true when done() held.
template <class predicate>
bool spin_until(predicate done) {
  auto start = std::chrono::steady_clock::now();
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done())
        return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() - start > spin_limit)
      return done();
  }
}

}  // namespace

void thread_pool::parallel_for(std::size_t num_tasks,
                               const std::function<void(std::size_t, std::size_t)>& fn) {
  if (num_tasks == 0)
    return;
  std::size_t threads = num_threads();
  if (threads == 1 || num_tasks == 1) {
    fn(0, num_tasks);
    return;
  }
  spread_jobs_.fetch_add(1, std::memory_order_relaxed);
  bool any_asleep;
  {
    std::lock_guard<std::mutex> guard{mutex_};
    job_ = &fn;
    job_tasks_ = num_tasks;
    pending_.store(workers_.size(), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    any_asleep = sleepers_ > 0;
  }
  if (any_asleep)
    wake_.notify_all();
  auto [begin, end] = range_of(0, num_tasks, threads);
  if (begin < end)
    fn(begin, end);
  auto all_done = [this] { return pending_.load(std::memory_order_acquire) == 0; };
  if (!spin_until(all_done)) {
    std::unique_lock<std::mutex> lock{mutex_};
    done_.wait(lock, all_done);
  }
  job_ = nullptr;
}

void thread_pool::worker_loop(std::size_t worker_idx) {
  std::size_t seen = 0;
  for (;;) {
    auto fresh = [&] { return generation_.load(std::memory_order_acquire) != seen; };
    if (!spin_until(fresh)) {
      std::unique_lock<std::mutex> lock{mutex_};
      ++sleepers_;
      wake_.wait(lock, [&] { return stopping_ || fresh(); });
      --sleepers_;
    }
    if (stopping_.load(std::memory_order_acquire))
      return;
    seen = generation_.load(std::memory_order_acquire);
    auto [begin, end] = range_of(worker_idx, job_tasks_, num_threads());
    if (begin < end)
      (*job_)(begin, end);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> guard{mutex_};  // the caller may be between its check and its wait
      done_.notify_one();
    }
  }
}

void parallel_for_if_worth(thread_pool* pool, std::size_t work, std::size_t num_tasks,
                           const std::function<void(std::size_t, std::size_t)>& fn) {
  if (pool != nullptr && work >= min_parallel_work)
    pool->parallel_for(num_tasks, fn);
  else if (num_tasks > 0)
    fn(0, num_tasks);
}

}  // namespace moert::cpu
