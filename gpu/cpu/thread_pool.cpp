#include "gpu/cpu/thread_pool.hpp"

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
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& worker : workers_)
    worker.join();
}

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
  {
    std::lock_guard<std::mutex> guard{mutex_};
    job_ = &fn;
    job_tasks_ = num_tasks;
    pending_ = workers_.size();
    ++generation_;
  }
  wake_.notify_all();
  auto [begin, end] = range_of(0, num_tasks, threads);
  if (begin < end)
    fn(begin, end);
  std::unique_lock<std::mutex> lock{mutex_};
  done_.wait(lock, [this] { return pending_ == 0; });
  job_ = nullptr;
}

void thread_pool::worker_loop(std::size_t worker_idx) {
  std::size_t seen = 0;
  for (;;) {
    const std::function<void(std::size_t, std::size_t)>* job;
    std::size_t tasks;
    {
      std::unique_lock<std::mutex> lock{mutex_};
      wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_)
        return;
      seen = generation_;
      job = job_;
      tasks = job_tasks_;
    }
    auto [begin, end] = range_of(worker_idx, tasks, num_threads());
    if (begin < end)
      (*job)(begin, end);
    {
      std::lock_guard<std::mutex> guard{mutex_};
      if (--pending_ == 0)
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
