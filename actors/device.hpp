#pragma once

// A compute device as the actors see it: one dedicated thread that runs kernel tasks in FIFO
// order (with a thread pool of `num_threads` for the kernels themselves). Actors post work
// and go on; the task sends its completion as a message. Nothing here blocks an actor.
//
// Thread safety: post() may be called from any thread. The destructor finishes every task
// already posted, then joins.

#include "gpu/backend.hpp"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace moert::actors {

class trace_recorder;

class device {
public:
  // Runs on the device thread with the device's backend (gpu/backend.hpp); it completes by
  // posting a message, from backend.when_done() where the backend is asynchronous.
  using task = std::function<void(gpu::backend&)>;

  // `trace` may be null; it must outlive the device.
  device(std::string name, std::size_t num_threads, trace_recorder* trace);
  ~device();

  device(const device&) = delete;
  device& operator=(const device&) = delete;

  const std::string& name() const { return name_; }
  // The backend the tasks run on (a cpu backend of `num_threads` threads). Its memory
  // functions may be called from any thread (attention shards allocate caches there).
  gpu::backend& backend() const { return *backend_; }

  // Queues `work`; `label` names the slice in the trace ("attention L3 mb1").
  void post(std::string label, task work);

  // Time spent running tasks since construction.
  std::chrono::nanoseconds busy_time() const;
  std::chrono::nanoseconds lifetime() const { return std::chrono::steady_clock::now() - started_; }

private:
  void run();

  std::string name_;
  trace_recorder* trace_;
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::pair<std::string, task>> queue_;
  std::chrono::nanoseconds busy_{0};
  bool stopping_ = false;
  std::size_t num_threads_;
  std::unique_ptr<gpu::backend> backend_;
  std::thread thread_;  // last: starts after every member above exists
};

}  // namespace moert::actors
