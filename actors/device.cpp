#include "actors/device.hpp"

#include "actors/trace.hpp"

#include "gpu/registry.hpp"

#include <caf/actor_system.hpp>
#include <caf/execution_unit.hpp>
#include <caf/logger.hpp>
#include <caf/resumable.hpp>
#include <caf/scheduler/abstract_coordinator.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/defaults.hpp>

#include <spdlog/spdlog.h>

#include <algorithm>
#include <typeinfo>
#include <vector>

namespace moert::actors {

namespace {

// Messages one inline activation may take (CAF's workers take every queued one by default):
// a mailbox that stays full goes back into the ready list behind the others.
constexpr std::size_t inline_throughput = 64;
// Activations in a row while a task waits: the device's own work is not starved by actors
// that keep messaging each other.
constexpr std::size_t max_inline_resumes = 256;

}  // namespace

class device::actor_unit final : public caf::execution_unit {
public:
  actor_unit(caf::actor_system& system, device& owner) : caf::execution_unit(&system), owner_(owner) {}
  // Any thread: the device thread, a pool thread that ran a concurrent task, or an actor that
  // runs here sending on. Thread-safe, unlike what the base class asks of a CAF worker.
  void exec_later(caf::resumable* job) override { owner_.schedule_actor(job); }

private:
  device& owner_;
};

device::device(std::string name, std::size_t num_threads, trace_recorder* trace)
    : name_(std::move(name)),
      trace_(trace),
      num_threads_(num_threads),
      backend_(gpu::create_backend(gpu::backend_kind::cpu, gpu::backend_options::with_threads(num_threads)).value()),
      thread_([this] { run(); }) {}

device::device(std::string name, std::unique_ptr<gpu::backend> backend, trace_recorder* trace)
    : name_(std::move(name)),
      trace_(trace),
      num_threads_(1),
      backend_(std::move(backend)),
      thread_([this] { run(); }) {}

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

caf::execution_unit* device::completion_unit(caf::actor_system& system) {
  std::lock_guard<std::mutex> guard{mutex_};
  if (!actors_inline_)
    return nullptr;
  if (!unit_) {
    // Under CAF's test coordinator (what the "testing" policy makes) a test drives every
    // actor itself: read from the config the system was built with, not by casting its
    // scheduler to a test-only class.
    if (caf::get_or(system.config(), "scheduler.policy", caf::defaults::scheduler::policy) == caf::atom("testing"))
      return nullptr;
    unit_ = std::make_unique<actor_unit>(system, *this);
  }
  return &unit_->system() == &system ? unit_.get() : nullptr;
}

void device::set_actors_inline(bool on) {
  std::lock_guard<std::mutex> guard{mutex_};
  actors_inline_ = on;
}

std::uint64_t device::inline_resumes() const {
  std::lock_guard<std::mutex> guard{mutex_};
  return inline_resumes_;
}

namespace {

// Whether `job` is a device_runnable actor. A cross-cast (dynamic_cast to a sibling base)
// walks the class hierarchy and compares type names: several per hop of every decode layer.
// The answer depends only on the dynamic type, so each thread keeps it per type (the few
// actor classes a process has); typeid of a polymorphic object is one vtable load.
bool is_device_runnable(caf::resumable* job) {
  struct known {
    const std::type_info* type;
    bool runnable;
  };
  thread_local std::vector<known> cache;
  const std::type_info* type = &typeid(*job);
  for (const known& k : cache)
    if (k.type == type)
      return k.runnable;
  bool runnable = dynamic_cast<device_runnable*>(job) != nullptr && job->subtype() == caf::resumable::scheduled_actor;
  cache.push_back({type, runnable});
  return runnable;
}

}  // namespace

void device::schedule_actor(caf::resumable* job) {
  bool here = is_device_runnable(job);
  if (here) {
    std::lock_guard<std::mutex> guard{mutex_};
    here = !stopped_;
    if (here) {
      ready_.push_back(job);
      note_work();
    }
  }
  if (here)
    wake_.notify_one();
  else
    unit_->system().scheduler().enqueue(job);  // what CAF does for a send without a unit
}

void device::note_work() {
  work_seq_.fetch_add(1, std::memory_order_release);
  if (lanes_waiting_ > 0)
    lanes_wake_.notify_all();
}

void device::resume_one(std::unique_lock<std::mutex>& lock, std::size_t lane) {
  caf::resumable* job = ready_.front();
  ready_.pop_front();
  ++inline_resumes_;
  running_task_ = true;  // drain() waits for actors that may still post
  lock.unlock();
  auto start = std::chrono::steady_clock::now();
  bool again = false;
  switch (job->resume(unit_.get(), inline_throughput)) {
    case caf::resumable::resume_later:
      again = true;  // keeps its reference
      break;
    case caf::resumable::done:
    case caf::resumable::awaiting_message:
    case caf::resumable::shutdown_execution_unit:
      caf::intrusive_ptr_release(job);
      break;
  }
  // A spawn or scoped_actor made here would pin CAF's logger to this thread, and the device
  // outlives the actor system (engine.cpp, caller_thread_release): drop that reference.
  if (caf::logger::current_logger() != nullptr)
    caf::logger::set_current_actor_system(nullptr);
  if (trace_)
    trace_->slice(lane == 0 ? name_ + " actors" : name_ + " lane " + std::to_string(lane) + " actors", "actor", start,
                  std::chrono::steady_clock::now());
  lock.lock();
  if (again) {
    ready_.push_back(job);
    note_work();
  }
}

void device::run_ready_actors(std::unique_lock<std::mutex>& lock) {
  std::size_t resumed = 0;
  while (!ready_.empty() && (resumed < max_inline_resumes || queue_.empty())) {
    // A concurrent task is next and the lanes can run the remaining actors beside it: start
    // it now (the first expert of a layer need not wait until the μ-queue's last batch is
    // handed and posted).
    if (pull_ready())
      return;
    ++resumed;
    resume_one(lock, 0);
  }
}

bool device::pull_ready() const {
  return !hook_ && lanes() > 1 && !queue_.empty() && queue_.front().concurrent &&
         ((queue_.size() >= 2 && queue_[1].concurrent) || !ready_.empty());
}

void device::enqueue(posted p) {
  {
    std::lock_guard<std::mutex> guard{mutex_};
    queue_.push_back(std::move(p));
    note_work();
  }
  wake_.notify_one();
}

void device::post(std::string label, task work, error_handler on_error) {
  enqueue({std::move(label), std::move(work), std::move(on_error), false});
}

void device::post_concurrent(std::string label, task work, error_handler on_error) {
  enqueue({std::move(label), std::move(work), std::move(on_error), true});
}

bool device::drain(std::chrono::milliseconds limit) {
  std::unique_lock<std::mutex> lock{mutex_};
  return idle_.wait_for(lock, limit, [this] { return queue_.empty() && ready_.empty() && !running_task_; });
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

device::outcome device::execute(posted& next, const task_hook& hook, gpu::backend& on) {
  outcome out;
  out.start = std::chrono::steady_clock::now();
  // An exception escaping this thread would call std::terminate: it becomes the task's error.
  try {
    if (hook)
      hook(next.label);
    next.work(on);
    // A failed operation (a CUDA error) does not throw: it sticks in the backend, and what
    // the task computed after it is garbage, so the task fails (and so will every later one).
    if (status backend_state = backend_->error(); !backend_state.ok())
      out.failure = backend_state.err().message;
  } catch (const std::exception& e) {
    out.failure = e.what();
  } catch (...) {
    out.failure = "unknown exception";
  }
  out.end = std::chrono::steady_clock::now();
  return out;
}

void device::run_pulled(std::vector<posted>& batch, std::vector<outcome>& outcomes, std::vector<std::size_t>& lane_of) {
  std::vector<std::vector<std::pair<posted, outcome>>> per_lane(lanes());
  {
    std::lock_guard<std::mutex> guard{mutex_};
    lanes_working_ = per_lane.size();
  }
  // One range per lane (work large enough that the backend always spreads it). Each lane
  // takes the concurrent task at the front of the queue; with none there, it runs an actor
  // that a completion woke (whichever lane is free: a μ-queue that hears of room hands its
  // next batch, a shard joins a layer, beside the other lane's task, not after it); with
  // neither, it waits while another lane still works (what that lane runs may post more). The
  // run ends when an ordinary task is next (it needs every thread) or every lane is out of work.
  backend_->concurrent(per_lane.size(), std::size_t(-1) / 2,
                       [&](gpu::backend& lane, std::size_t begin, std::size_t end) {
                         for (std::size_t l = begin; l < end; ++l)
                           pull_on_lane(lane, l, per_lane[l]);
                       });
  for (std::size_t l = 0; l < per_lane.size(); ++l)
    for (auto& [task, out] : per_lane[l]) {
      batch.push_back(std::move(task));
      outcomes.push_back(std::move(out));
      lane_of.push_back(l);
    }
}

void device::pull_on_lane(gpu::backend& lane, std::size_t l, std::vector<std::pair<posted, outcome>>& ran) {
  // How long a lane out of work spins before it sleeps: a completion usually wakes an actor
  // within a task's length, and a futex wake-up costs 10-80 µs on this VM (thread_pool.cpp).
  constexpr auto spin_limit = std::chrono::microseconds{50};
  std::size_t resumed_while_waiting = 0;
  std::unique_lock<std::mutex> lock{mutex_};
  for (;;) {
    if (!queue_.empty() && queue_.front().concurrent) {
      posted next = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      outcome out = execute(next, {}, lane);
      // Its captures (an expert batch's rows, with their transport pool credit) go now, not
      // when the whole pulled run ends.
      next.work = {};
      ran.emplace_back(std::move(next), std::move(out));
      lock.lock();
      continue;
    }
    // Actors that keep messaging each other do not hold off an ordinary task for long.
    bool task_waits = !queue_.empty();
    if (!ready_.empty() && (!task_waits || ++resumed_while_waiting <= max_inline_resumes)) {
      resume_one(lock, l);
      continue;
    }
    if (!queue_.empty() || lanes_working_ == 0)
      break;  // an ordinary task is next, or every other lane has left
    if (--lanes_working_ == 0) {
      note_work();  // the last one: the lanes waiting leave too
      break;
    }
    std::uint64_t seen = work_seq_.load(std::memory_order_acquire);
    lock.unlock();
    auto spin_start = std::chrono::steady_clock::now();
    while (work_seq_.load(std::memory_order_acquire) == seen &&
           std::chrono::steady_clock::now() - spin_start < spin_limit)
      for (int i = 0; i < 64; ++i) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      }
    lock.lock();
    ++lanes_waiting_;
    // Bounded waits, rechecked: work (a post, a woken actor) or the last working lane leaving.
    while (queue_.empty() && ready_.empty() && lanes_working_ > 0)
      lanes_wake_.wait_for(lock, std::chrono::milliseconds{10});
    --lanes_waiting_;
    if (lanes_working_ == 0)
      break;
    ++lanes_working_;
  }
}

void device::run() {
  for (;;) {
    std::vector<posted> batch;  // one task, or up to lanes() concurrent ones from the front
    task_hook hook;
    double slow = 1.0;
    bool pulled = false;  // concurrent tasks that the lanes take from the queue themselves
    {
      std::unique_lock<std::mutex> lock{mutex_};
      wake_.wait(lock, [this] { return stopping_ || !queue_.empty() || !ready_.empty(); });
      run_ready_actors(lock);
      if (queue_.empty()) {  // and so ready_ is empty too (run_ready_actors stops only then)
        running_task_ = false;
        if (!stopping_) {
          lock.unlock();
          idle_.notify_all();
          continue;
        }
        stopped_ = true;  // stopping, and every posted task has run
        return;
      }
      hook = hook_;
      slow = slowdown_;
      // Hooks run on the device thread before their tasks (they need not be thread-safe), so
      // with one the lanes do not pull: the batch is what is queued now.
      pulled = pull_ready();
      if (!pulled)
        do {
          batch.push_back(std::move(queue_.front()));
          queue_.pop_front();
        } while (batch.back().concurrent && batch.size() < lanes() && !queue_.empty() && queue_.front().concurrent);
      running_task_ = true;
    }
    std::vector<outcome> outcomes(batch.size());
    std::vector<std::size_t> lane_of(batch.size(), 0);  // for the trace
    for (std::size_t i = 0; i < lane_of.size(); ++i)
      lane_of[i] = i;
    if (pulled) {
      run_pulled(batch, outcomes, lane_of);
    } else if (batch.size() == 1) {
      outcomes[0] = execute(batch[0], hook, *backend_);
    } else {
      // Hooks run here, on the device thread, as for a single task (they need not be
      // thread-safe); a hook that throws fails its task, which then does not run.
      std::vector<std::size_t> to_run;
      for (std::size_t i = 0; i < batch.size(); ++i) {
        outcomes[i].start = outcomes[i].end = std::chrono::steady_clock::now();
        try {
          if (hook)
            hook(batch[i].label);
          to_run.push_back(i);
        } catch (const std::exception& e) {
          outcomes[i].failure = e.what();
        } catch (...) {
          outcomes[i].failure = "unknown exception";
        }
      }
      // Work large enough that the backend always spreads it: one task per lane.
      backend_->concurrent(to_run.size(), std::size_t(-1) / 2,
                           [&](gpu::backend& lane, std::size_t begin, std::size_t end) {
                             for (std::size_t j = begin; j < end; ++j)
                               outcomes[to_run[j]] = execute(batch[to_run[j]], {}, lane);
                           });
    }
    // Cannot happen (a pulled run starts with two concurrent tasks queued, and only the lanes
    // pop them), but outcomes[0] below needs one.
    if (outcomes.empty()) {
      std::lock_guard<std::mutex> guard{mutex_};
      running_task_ = false;
      continue;
    }
    auto first_start = outcomes[0].start, last_end = outcomes[0].end;
    for (const outcome& o : outcomes) {
      first_start = std::min(first_start, o.start);
      last_end = std::max(last_end, o.end);
    }
    if (slow > 1.0) {  // a slowed device (fault plan): busy (factor - 1) x the tasks' time more
      std::this_thread::sleep_for((last_end - first_start) * (slow - 1.0));
      last_end = std::chrono::steady_clock::now();
    }
    std::uint64_t failures = 0;
    std::size_t ran = batch.size();
    std::vector<std::string> labels;  // for the trace only
    for (std::size_t i = 0; i < batch.size(); ++i) {
      if (!outcomes[i].failure.empty()) {
        ++failures;
        std::string why = batch[i].label + " on " + name_ + ": " + outcomes[i].failure;
        if (batch[i].on_error)
          batch[i].on_error(std::move(why));
        else
          spdlog::error("device task failed and nobody listens: {}", why);
      }
      if (trace_)
        labels.push_back(std::move(batch[i].label));
    }
    batch.clear();  // the tasks' captures go before the device reports itself idle
    {
      std::lock_guard<std::mutex> guard{mutex_};
      busy_ += last_end - first_start;
      failed_ += failures;
      stretched_ += slow > 1.0 ? ran : 0;
      running_task_ = false;
    }
    idle_.notify_all();
    if (trace_)
      for (std::size_t i = 0; i < labels.size(); ++i)
        trace_->slice(lane_of[i] == 0 ? name_ : name_ + " lane " + std::to_string(lane_of[i]), labels[i],
                      outcomes[i].start, outcomes[i].end);
  }
}

}  // namespace moert::actors
