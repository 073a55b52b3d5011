#include "actors/device.hpp"

#include "actors/trace.hpp"

#include "gpu/registry.hpp"

namespace moert::actors {

device::device(std::string name, std::size_t num_threads, trace_recorder* trace)
    : name_(std::move(name)),
      trace_(trace),
      num_threads_(num_threads),
      backend_(gpu::create_backend(gpu::backend_kind::cpu, {.num_threads = num_threads}).value()),
      thread_([this] { run(); }) {}

device::~device() {
  {
    std::lock_guard<std::mutex> guard{mutex_};
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void device::post(std::string label, task work) {
  {
    std::lock_guard<std::mutex> guard{mutex_};
    queue_.emplace_back(std::move(label), std::move(work));
  }
  wake_.notify_one();
}

std::chrono::nanoseconds device::busy_time() const {
  std::lock_guard<std::mutex> guard{mutex_};
  return busy_;
}

void device::run() {
  for (;;) {
    std::pair<std::string, task> next;
    {
      std::unique_lock<std::mutex> lock{mutex_};
      wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty())
        return;  // stopping, and every posted task has run
      next = std::move(queue_.front());
      queue_.pop_front();
    }
    auto start = std::chrono::steady_clock::now();
    next.second(*backend_);
    auto end = std::chrono::steady_clock::now();
    {
      std::lock_guard<std::mutex> guard{mutex_};
      busy_ += end - start;
    }
    if (trace_)
      trace_->slice(name_, next.first, start, end);
  }
}

}  // namespace moert::actors
