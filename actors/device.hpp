#pragma once

// A compute device as the actors see it: one dedicated thread that runs kernel tasks in FIFO
// order (with a thread pool of `num_threads` for the kernels themselves). Actors post work
// and go on; the task sends its completion as a message. Nothing here blocks an actor.
//
// A task that throws does not take the process down: the device catches it and calls the
// task's `on_error` with "<label> on <device>: <what>", then runs the next task. Actors pass
// an on_error that makes them exit with that reason, so their supervisor hears the cause.
//
// Thread safety: post(), drain() and set_task_hook() may be called from any thread. The
// destructor finishes every task already posted, then joins.
//
// Actors on the device thread (off unless set_actors_inline(true); the engine sets it on its
// in-process devices, node_host on a node's): a task's completion message sent through
// completion_unit() (actors/completion.hpp) runs its actor here, right after the task, when
// that actor is a device_runnable (the shard, μ-queue and expert actors); what it sends in
// turn to other device_runnable actors runs here too. Every other actor goes to CAF's
// scheduler as usual.
// A decode step is a chain of such hops (attention → shard → μ-queue → experts → device →
// experts → shard → device); through CAF's scheduler each hop woke a sleeping thread,
// 20-100 µs on this VM's 2 cores, ~1 ms of idle device per decode token.

#include "gpu/backend.hpp"
#include "model/weights.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <span>
#include <thread>
#include <vector>

namespace caf {
class actor_system;
class execution_unit;
class resumable;
}  // namespace caf

namespace moert::actors {

class trace_recorder;

// Marks an actor class whose messages may be handled on a device thread (see device): it
// must not block and not spawn (actors/completion.hpp).
class device_runnable {
protected:
  ~device_runnable() = default;
};

class device {
public:
  // Runs on the device thread with the device's backend (gpu/backend.hpp); it completes by
  // posting a message, from backend.when_done() where the backend is asynchronous.
  using task = std::function<void(gpu::backend&)>;
  using error_handler = std::function<void(std::string why)>;
  // Runs on the device thread before every task, with its label; what it throws counts as
  // the task's failure (tests and the fault injector use it to fail or slow a device).
  using task_hook = std::function<void(const std::string& label)>;

  // `trace` may be null; it must outlive the device. This one runs a cpu backend of
  // `num_threads` threads.
  device(std::string name, std::size_t num_threads, trace_recorder* trace);
  // Runs `backend` (one backend, one stream, per device executor), e.g. from
  // make_device_backend(). Must not be null.
  device(std::string name, std::unique_ptr<gpu::backend> backend, trace_recorder* trace);
  ~device();

  device(const device&) = delete;
  device& operator=(const device&) = delete;

  const std::string& name() const { return name_; }
  // The backend the tasks run on. Its memory functions may be called from any thread
  // (attention shards allocate caches and residuals there).
  gpu::backend& backend() const { return *backend_; }

  // This device's own copy of the weights it uses, on its backend (an expert device only its
  // experts, an attention device the rest): set once by whoever builds the device, before
  // any actor uses it; null when the device reads the engine's shared host weights.
  void set_weights(std::shared_ptr<const model::model_weights> weights) { weights_ = std::move(weights); }
  const std::shared_ptr<const model::model_weights>& weights() const { return weights_; }

  // Queues `work`; `label` names the slice in the trace ("attention L3 mb1").
  void post(std::string label, task work, error_handler on_error = {});
  // As post(), for a task independent of every other such task (one expert batch): those
  // next in the queue run side by side, each on one thread of the pool with a single-threaded
  // lane as its backend (gpu::backend::concurrent), as the reference forward runs a layer's
  // experts. A lane that finishes one takes the next concurrent task at the front of the queue
  // (with a task hook: up to lanes() of them, taken together). Their results do not depend on
  // the lane (batch-invariant kernels), only the barriers and hand-offs between them go.
  void post_concurrent(std::string label, task work, error_handler on_error = {});
  // How many concurrent tasks run at once: the pool's threads on a host-memory backend, else 1.
  std::size_t lanes() const { return std::max<std::size_t>(1, num_threads_); }

  // Waits until every task posted so far has run, at most `limit`; false on timeout.
  bool drain(std::chrono::milliseconds limit);
  void set_task_hook(task_hook hook);
  std::uint64_t failed_tasks() const;
  std::size_t queued() const;  // posted and not yet started
  // A slow device (fault plan "slow"): after each task it stays busy (factor - 1) times the
  // task's time, so its throughput drops by `factor` (the task's own completion is not held).
  void set_slowdown(double factor);
  std::uint64_t stretched_tasks() const;

  // The CAF execution unit of this device's thread, for actors of `system` (the first system
  // asked); null, i.e. CAF's scheduler as for caf::anon_send, when actors do not run inline,
  // for another system, or under CAF's test coordinator (a test drives every actor itself).
  // Any thread; lives as long as the device.
  caf::execution_unit* completion_unit(caf::actor_system& system);
  // Whether device_runnable actors run on this device's thread (see above). Any thread.
  void set_actors_inline(bool on);
  // Actor activations run on the device thread so far (device_runnable actors resumed here).
  std::uint64_t inline_resumes() const;

  // Time spent running tasks since construction.
  std::chrono::nanoseconds busy_time() const;
  std::chrono::nanoseconds lifetime() const { return std::chrono::steady_clock::now() - started_; }

private:
  class actor_unit;
  void run();
  // From actor_unit::exec_later (any thread): runs `job` on the device thread soon, or hands
  // it to CAF's scheduler when it is not device_runnable or the device is stopping.
  void schedule_actor(caf::resumable* job);
  // On the device thread, with `lock` held on entry and exit: resumes ready actors, at most
  // max_inline_resumes in a row while a task waits; returns early when pull_ready().
  void run_ready_actors(std::unique_lock<std::mutex>& lock);
  // With `lock` held on entry and exit: resumes the first ready actor on this thread, lane
  // `lane` of a pulled run (0: the device thread).
  void resume_one(std::unique_lock<std::mutex>& lock, std::size_t lane);
  // Under mutex_: whether the lanes should pull now (a concurrent task is next, and a second
  // one is queued or actors that may post more are ready).
  bool pull_ready() const;
  // Under mutex_: a task or an actor became ready, or a lane left a pulled run.
  void note_work();

  std::string name_;
  trace_recorder* trace_;
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  struct posted {
    std::string label;
    task work;
    error_handler on_error;
    bool concurrent = false;
  };
  void enqueue(posted p);
  struct outcome {
    std::chrono::steady_clock::time_point start, end;
    std::string failure;
  };
  // Runs one task on `on` (the backend or a lane) with the hook; catches what it throws.
  outcome execute(posted& next, const task_hook& hook, gpu::backend& on);
  // Concurrent tasks from the front of the queue, taken one at a time by whichever lane is
  // free, until the front is not a concurrent task; appends what ran, its outcome and lane.
  void run_pulled(std::vector<posted>& batch, std::vector<outcome>& outcomes, std::vector<std::size_t>& lane_of);
  // Lane `l` of a pulled run (on whichever thread runs that lane): concurrent tasks first,
  // then ready actors, until the run ends; appends the tasks it ran to `ran`.
  void pull_on_lane(gpu::backend& lane, std::size_t l, std::vector<std::pair<posted, outcome>>& ran);
  std::deque<posted> queue_;
  std::condition_variable idle_;
  bool running_task_ = false;
  task_hook hook_;
  std::uint64_t failed_ = 0;
  double slowdown_ = 1.0;
  std::uint64_t stretched_ = 0;
  std::chrono::nanoseconds busy_{0};
  bool stopping_ = false;
  bool stopped_ = false;  // the thread has left run(): schedule_actor hands actors to CAF
  std::deque<caf::resumable*> ready_;  // actors to resume here, each holding a reference
  // A pulled run's lanes that are not waiting for work (under mutex_); 0 ends the run.
  std::size_t lanes_working_ = 0;
  std::size_t lanes_waiting_ = 0;  // lanes asleep on lanes_wake_ (under mutex_)
  std::condition_variable lanes_wake_;
  // Bumped under mutex_ by note_work(): what a lane out of work spins on before it sleeps.
  std::atomic<std::uint64_t> work_seq_{0};
  std::uint64_t inline_resumes_ = 0;
  std::unique_ptr<actor_unit> unit_;    // set once, under mutex_
  bool actors_inline_ = false;
  std::size_t num_threads_;
  std::unique_ptr<gpu::backend> backend_;
  std::shared_ptr<const model::model_weights> weights_;
  std::thread thread_;  // last: starts after every member above exists
};

// Host rows at the actor boundary (A2E/E2A rows, each `dim` floats) where `backend` can read
// them: the pointers as given when its memory is host memory (no copy), else the rows packed
// into `staging` (allocated and uploaded here) and pointers into it, in the same order. For
// device tasks (it runs on the device thread); `staging` must outlive the operations that read it.
std::vector<const float*> stage_rows(gpu::backend& backend, std::span<const float* const> rows_host, std::size_t dim,
                                     gpu::buffer& staging);

}  // namespace moert::actors
