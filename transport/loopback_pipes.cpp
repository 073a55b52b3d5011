#include "transport/pipe_transport.hpp"

#include <pthread.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <utility>

namespace moert::transport {

namespace {

using clock_type = std::chrono::steady_clock;

struct pending_send {
  std::shared_ptr<const std::vector<std::uint8_t>> bytes;
  pipe_transport::done finished;
  clock_type::time_point deadline;
};

struct pending_receive {
  void* dest = nullptr;
  std::size_t num_bytes = 0;
  pipe_transport::done finished;
  clock_type::time_point deadline;
};

// Both ends of one pipe, as one key names them.
struct line {
  std::uint64_t next_send = 0;     // the sequence number send() hands out next
  std::uint64_t next_receive = 0;  // the one a receive completes next
  std::map<std::uint64_t, pending_send> sent;
  std::map<std::uint64_t, pending_receive> receives;
  std::string failure;  // non-empty: failed for good
};

using callback_list = std::vector<std::pair<pipe_transport::done, status>>;

class loopback_pipes final : public pipe_transport {
public:
  explicit loopback_pipes(std::chrono::milliseconds timeout) : timeout_(timeout), thread_([this] { run(); }) {}
  ~loopback_pipes() override {
    {
      std::lock_guard lock{mutex_};
      stopping_ = true;
    }
    wake_.notify_all();
    thread_.join();
  }

  std::string name() const override { return "loopback pipes"; }

  result<pipe_key> make_key() override {
    std::lock_guard lock{mutex_};
    pipe_key key{};
    std::uint64_t n = ++keys_made_;
    std::memcpy(key.data(), &n, sizeof n);
    return key;
  }
  result<pipe_id> open_send(const pipe_key& key) override { return open(key, true); }
  result<pipe_id> open_receive(const pipe_key& key) override { return open(key, false); }

  result<std::uint64_t> send(pipe_id pipe, std::shared_ptr<const std::vector<std::uint8_t>> bytes,
                             done finished) override {
    std::lock_guard lock{mutex_};
    auto it = ends_.find(pipe);
    if (it == ends_.end() || !it->second.second)
      return make_error(error_code::invalid_argument,
                        "loopback pipes: pipe " + std::to_string(pipe) + " is not a sending pipe");
    line& l = lines_[it->second.first];
    if (!l.failure.empty())
      return make_error(error_code::io_error, l.failure);
    std::uint64_t sequence = l.next_send++;
    l.sent.emplace(sequence, pending_send{std::move(bytes), std::move(finished), clock_type::now() + timeout_});
    work_ = true;
    wake_.notify_all();
    return sequence;
  }

  void receive(pipe_id pipe, std::uint64_t sequence, void* dest, std::size_t num_bytes, done finished) override {
    std::lock_guard lock{mutex_};
    auto it = ends_.find(pipe);
    if (it == ends_.end() || it->second.second) {
      deferred_.emplace_back(std::move(finished),
                             make_error(error_code::invalid_argument,
                                        "loopback pipes: pipe " + std::to_string(pipe) + " is not a receiving pipe"));
    } else {
      line& l = lines_[it->second.first];
      if (!l.failure.empty())
        deferred_.emplace_back(std::move(finished), make_error(error_code::io_error, l.failure));
      else if (sequence < l.next_receive || l.receives.count(sequence))
        deferred_.emplace_back(std::move(finished),
                               make_error(error_code::invalid_argument,
                                          "loopback pipes: message " + std::to_string(sequence) + " of pipe " +
                                              std::to_string(pipe) + " was already received or posted"));
      else
        l.receives.emplace(sequence, pending_receive{dest, num_bytes, std::move(finished), clock_type::now() + timeout_});
    }
    work_ = true;
    wake_.notify_all();
  }

  void cancel(pipe_id pipe, std::string reason) override {
    std::lock_guard lock{mutex_};
    auto it = ends_.find(pipe);
    if (it != ends_.end())
      fail(lines_[it->second.first], reason, deferred_);
    work_ = true;
    wake_.notify_all();
  }

private:
  result<pipe_id> open(const pipe_key& key, bool sender) {
    std::lock_guard lock{mutex_};
    for (const auto& [id, end] : ends_)
      if (end.first == key && end.second == sender)
        return make_error(error_code::invalid_argument, std::string("loopback pipes: the ") +
                                                            (sender ? "sending" : "receiving") +
                                                            " end of this key is open already");
    pipe_id id = next_pipe_++;
    ends_.emplace(id, std::make_pair(key, sender));
    lines_[key];
    return id;
  }

  static void fail(line& l, const std::string& reason, callback_list& callbacks) {
    if (!l.failure.empty())
      return;
    l.failure = reason;
    status failed = make_error(error_code::io_error, reason);
    for (auto& [sequence, s] : l.sent)
      callbacks.emplace_back(std::move(s.finished), failed);
    for (auto& [sequence, r] : l.receives)
      callbacks.emplace_back(std::move(r.finished), failed);
    l.sent.clear();
    l.receives.clear();
  }

  // Moves what matched, fails the line on a deadline passed; returns the earliest deadline of
  // what is still pending (max: nothing), found in the same walk.
  clock_type::time_point step(line& l, clock_type::time_point now, callback_list& callbacks) {
    constexpr auto none = clock_type::time_point::max();
    if (!l.failure.empty())
      return none;
    while (!l.receives.empty() && l.receives.begin()->first == l.next_receive) {
      auto s = l.sent.find(l.next_receive);
      if (s == l.sent.end())
        break;
      pending_receive& r = l.receives.begin()->second;
      if (r.num_bytes != s->second.bytes->size()) {
        fail(l, "loopback pipes: message " + std::to_string(l.next_receive) + " has " +
                           std::to_string(s->second.bytes->size()) + " bytes, its receive asked for " +
                           std::to_string(r.num_bytes),
             callbacks);
        return none;
      }
      if (r.num_bytes != 0)
        std::memcpy(r.dest, s->second.bytes->data(), r.num_bytes);
      callbacks.emplace_back(std::move(s->second.finished), status::success());
      callbacks.emplace_back(std::move(r.finished), status::success());
      l.sent.erase(s);
      l.receives.erase(l.receives.begin());
      ++l.next_receive;
    }
    auto next = none;
    for (const auto& [sequence, s] : l.sent) {
      if (now > s.deadline) {
        fail(l, "loopback pipes: send of message " + std::to_string(sequence) + " timed out", callbacks);
        return none;
      }
      next = std::min(next, s.deadline);
    }
    for (const auto& [sequence, r] : l.receives) {
      if (now > r.deadline) {
        fail(l, "loopback pipes: receive of message " + std::to_string(sequence) + " timed out", callbacks);
        return none;
      }
      next = std::min(next, r.deadline);
    }
    return next;
  }

  void run() {
    ::pthread_setname_np(::pthread_self(), "loopback-pipes");  // for top -H, perf and tests
    // The earliest deadline pending after the last pass (every call that adds an entry wakes
    // this thread, so what it adds is in the next pass).
    auto next_deadline = clock_type::time_point::max();
    for (;;) {
      callback_list callbacks;
      bool stop = false;
      {
        std::unique_lock lock{mutex_};
        // Asleep until a call brings work or the next deadline passes (`work_` keeps a call
        // made while this thread was busy from being missed); it polled every 1 ms before.
        // Deadlines are checked with `>`, hence the 1 ms past it; at most 1 s asleep. The
        // deadline comes from the last pass's step(): each entry is walked once per wake-up.
        auto until = clock_type::now() + std::chrono::seconds{1};
        if (next_deadline != clock_type::time_point::max())
          until = std::min(until, next_deadline + std::chrono::milliseconds{1});
        wake_.wait_until(lock, until, [this] { return work_ || stopping_; });
        work_ = false;
        stop = stopping_;
        callbacks.swap(deferred_);
        auto now = clock_type::now();
        next_deadline = clock_type::time_point::max();
        for (auto& [key, l] : lines_) {
          if (stop)
            fail(l, "loopback pipes closed", callbacks);
          else
            next_deadline = std::min(next_deadline, step(l, now, callbacks));
        }
      }
      for (auto& [finished, outcome] : callbacks)
        if (finished)
          finished(std::move(outcome));
      if (stop)
        return;
    }
  }

  std::chrono::milliseconds timeout_;
  std::mutex mutex_;  // guards every member below but the thread
  std::condition_variable wake_;
  std::map<pipe_id, std::pair<pipe_key, bool>> ends_;  // pipe -> (key, sending end)
  std::map<pipe_key, line> lines_;
  callback_list deferred_;
  pipe_id next_pipe_ = 1;
  std::uint64_t keys_made_ = 0;
  bool work_ = false;  // a call queued something for the thread since it last looked
  bool stopping_ = false;
  std::thread thread_;  // last: starts once every member above exists
};

}  // namespace

std::unique_ptr<pipe_transport> make_loopback_pipes(std::chrono::milliseconds timeout) {
  return std::make_unique<loopback_pipes>(timeout);
}

}  // namespace moert::transport
