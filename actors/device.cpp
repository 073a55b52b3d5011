#include "actors/device.hpp"

#include "actors/trace.hpp"

#include "gpu/registry.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

namespace moert::actors {

device::device(std::string name, std::size_t num_threads, trace_recorder* trace)
    : name_(std::move(name)),
      trace_(trace),
      num_threads_(num_threads),
      backend_(gpu::create_backend(gpu::backend_kind::cpu, gpu::backend_options::with_threads(num_threads)).value()),
      thread_([this] { run(); }) {}

device::device(std::string name, std::unique_ptr<gpu::backend> backend, trace_recorder* trace)
    : name_(std::move(name)), trace_(trace), num_threads_(1), backend_(std::move(backend)), thread_([this] { run(); }) {}

std::vector<const float*> stage_rows(gpu::backend& backend, std::span<const float* const> rows_host, std::size_t dim,
                                     gpu::buffer& staging) {
  std::vector<const float*> out(rows_host.begin(), rows_host.end());
  if (gpu::holds_host_memory(backend) || rows_host.empty())
    return out;
  std::vector<float> packed(rows_host.size() * dim);
  for (std::size_t r = 0; r < rows_host.size(); ++r)
    if (rows_host[r])
      std::copy_n(rows_host[r], dim, packed.data() + r * dim);
  staging = backend.upload_floats(packed);
  for (std::size_t r = 0; r < rows_host.size(); ++r)
    out[r] = rows_host[r] ? staging.floats() + r * dim : nullptr;
  return out;
}

device::~device() {
  {
    std::lock_guard<std::mutex> guard{mutex_};
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

void device::post(std::string label, task work, error_handler on_error) {
  {
    std::lock_guard<std::mutex> guard{mutex_};
    queue_.push_back({std::move(label), std::move(work), std::move(on_error)});
  }
  wake_.notify_one();
}

bool device::drain(std::chrono::milliseconds limit) {
  std::unique_lock<std::mutex> lock{mutex_};
  return idle_.wait_for(lock, limit, [this] { return queue_.empty() && !running_task_; });
}

void device::set_task_hook(task_hook hook) {
  std::lock_guard<std::mutex> guard{mutex_};
  hook_ = std::move(hook);
}

void device::set_slowdown(double factor) {
  std::lock_guard<std::mutex> guard{mutex_};
  slowdown_ = factor;
}

std::uint64_t device::stretched_tasks() const {
  std::lock_guard<std::mutex> guard{mutex_};
  return stretched_;
}

std::uint64_t device::failed_tasks() const {
  std::lock_guard<std::mutex> guard{mutex_};
  return failed_;
}

std::size_t device::queued() const {
  std::lock_guard<std::mutex> guard{mutex_};
  return queue_.size();
}

std::chrono::nanoseconds device::busy_time() const {
  std::lock_guard<std::mutex> guard{mutex_};
  return busy_;
}

void device::run() {
  for (;;) {
    posted next;
    task_hook hook;
    double slow = 1.0;
    {
      std::unique_lock<std::mutex> lock{mutex_};
      wake_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty())
        return;  // stopping, and every posted task has run
      next = std::move(queue_.front());
      queue_.pop_front();
      running_task_ = true;
      hook = hook_;
      slow = slowdown_;
    }
    auto start = std::chrono::steady_clock::now();
    std::string failure;
    // An exception escaping this thread would call std::terminate: it becomes the task's error.
    try {
      if (hook)
        hook(next.label);
      next.work(*backend_);
      // A failed operation (a CUDA error) does not throw: it sticks in the backend, and what
      // the task computed after it is garbage, so the task fails (and so will every later one).
      if (status backend_state = backend_->error(); !backend_state.ok())
        failure = backend_state.err().message;
    } catch (const std::exception& e) {
      failure = e.what();
    } catch (...) {
      failure = "unknown exception";
    }
    auto end = std::chrono::steady_clock::now();
    if (slow > 1.0) {  // a slowed device (fault plan): busy (factor - 1) x the task's time more
      std::this_thread::sleep_for((end - start) * (slow - 1.0));
      end = std::chrono::steady_clock::now();
    }
    if (!failure.empty()) {
      std::string why = next.label + " on " + name_ + ": " + failure;
      if (next.on_error)
        next.on_error(std::move(why));
      else
        spdlog::error("device task failed and nobody listens: {}", why);
    }
    std::string label = std::move(next.label);
    next = {};  // the task's captures go before the device reports itself idle
    {
      std::lock_guard<std::mutex> guard{mutex_};
      busy_ += end - start;
      failed_ += failure.empty() ? 0 : 1;
      stretched_ += slow > 1.0 ? 1 : 0;
      running_task_ = false;
    }
    idle_.notify_all();
    if (trace_)
      trace_->slice(name_, label, start, end);
  }
}

}  // namespace moert::actors
