#include "transport/ucx_channel.hpp"

#include <ucp/api/ucp.h>

#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

namespace moert::transport {
namespace {

using clock = std::chrono::steady_clock;

error ucx_error(const std::string& what, ucs_status_t status) {
  return make_error(error_code::io_error, "UCX " + what + ": " + ucs_status_string(status));
}

// Pool accounting and the free receive buffers outlive the channel: a received_buffer may be
// released after it.
struct pool_state {
  std::mutex mutex;
  std::size_t in_use = 0;    // credit taken by receives and by what they delivered
  std::size_t capacity = 0;
  // Buffers receive() is done with, by capacity: reused without a fresh allocation, page
  // faults or a zero fill. Bounded: at most `capacity` bytes are kept.
  std::multimap<std::size_t, std::unique_ptr<std::uint8_t[]>> free_buffers;
  std::size_t free_bytes = 0;

  void release(std::size_t bytes) {
    std::lock_guard<std::mutex> guard{mutex};
    in_use -= bytes;
  }
  std::unique_ptr<std::uint8_t[]> take(std::size_t bytes, std::size_t& buffer_capacity) {
    {
      std::lock_guard<std::mutex> guard{mutex};
      auto it = free_buffers.lower_bound(bytes);
      // A buffer up to twice the size will do; a far larger one stays for a large message.
      if (it != free_buffers.end() && it->first <= 2 * std::max<std::size_t>(bytes, 4096)) {
        // Of the buffers of that capacity, the one given back last (equal keys keep their
        // insertion order): its bytes are the likeliest to be in the cache still, where the
        // first one given back is the coldest of a stream's window.
        it = std::prev(free_buffers.upper_bound(it->first));
        buffer_capacity = it->first;
        auto buffer = std::move(it->second);
        free_bytes -= it->first;
        free_buffers.erase(it);
        return buffer;
      }
    }
    buffer_capacity = std::max<std::size_t>(bytes, 1);
    return std::unique_ptr<std::uint8_t[]>(new std::uint8_t[buffer_capacity]);  // not zero-filled
  }
  void give_back(std::unique_ptr<std::uint8_t[]> buffer, std::size_t buffer_capacity) {
    std::lock_guard<std::mutex> guard{mutex};
    while (free_bytes + buffer_capacity > capacity && !free_buffers.empty()) {
      auto oldest = free_buffers.begin();  // the smallest: the cheapest to allocate again
      free_bytes -= oldest->first;
      free_buffers.erase(oldest);
    }
    if (free_bytes + buffer_capacity <= capacity) {
      free_bytes += buffer_capacity;
      free_buffers.emplace(buffer_capacity, std::move(buffer));
    }
  }
};

}  // namespace

const char* to_string(ucx_transport transport) {
  return transport == ucx_transport::tcp ? "ucx-tcp" : "ucx-posix";
}

// Every member below `mutex` is guarded by it; the channel thread and callers take turns on
// the worker (UCS_THREAD_MODE_SERIALIZED).
struct ucx_channel::impl {
  // One send or receive in flight. Lives in `ops` until UCX is done with its buffer, which
  // can be after its caller was told of a timeout.
  struct operation {
    ucx_channel::impl* owner = nullptr;
    peer_id peer = 0;
    bool is_send = false;
    void* request = nullptr;  // UCX's, until it completes
    std::size_t size = 0;     // a receive's expected length
    ucs_status_t inline_status = UCS_OK;
    clock::time_point deadline;
    bool reported = false;    // the caller's callback has been queued
    bool ucx_done = false;
    std::shared_ptr<const void> keep;  // the bytes UCX reads or writes
    send_done on_sent;
    receive_into_done on_received;
  };

  struct endpoint_error_context {
    impl* owner;
    peer_id peer;
  };

  ucx_channel_config config;
  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;
  int event_fd = -1;  // UCX's: readable on network events once the worker is armed
  int wake_fd = -1;   // ours: callers and the destructor wake the channel thread through it
  std::shared_ptr<pool_state> pool = std::make_shared<pool_state>();
  std::atomic<std::uint64_t> send_failures{0};
  std::atomic<std::uint64_t> wakeups{0};
  std::thread thread;

  std::mutex mutex;
  bool stopping = false;
  bool sleeping = false;  // the channel thread waits on wake_fd (and on event_fd if it armed)
  std::unordered_map<peer_id, ucp_ep_h> endpoints;
  peer_id next_peer = 1;
  std::list<operation> ops;
  std::list<endpoint_error_context> error_contexts;  // stable addresses for UCX
  std::unordered_map<peer_id, std::string> failed_peers;
  std::vector<std::function<void()>> ready;  // callbacks the channel thread runs, unlocked
  clock::time_point last_progress;
  operation* inline_op = nullptr;  // the receive being started in a caller's call

  static constexpr std::chrono::microseconds spin_window{2000};
  std::atomic<clock::rep> last_poll{0};  // clock::time_point of the last poll(), as a count
  static constexpr int progress_per_turn = 16;

  // tcp's peer-failure handler: the peer's process is gone or unreachable.
  static void on_endpoint_error(void* arg, ucp_ep_h, ucs_status_t status) {
    auto* context = static_cast<endpoint_error_context*>(arg);
    std::string reason = std::string("UCX peer ") + std::to_string(context->peer) + " failed: " + ucs_status_string(status);
    context->owner->failed_peers.emplace(context->peer, reason);
    context->owner->fail_peer(context->peer, reason);
  }

  static void on_send_complete(void*, ucs_status_t status, void* user) {
    auto* op = static_cast<operation*>(user);
    op->owner->complete(*op, status);
  }
  static void on_receive_complete(void*, ucs_status_t status, const ucp_tag_recv_info_t* info, void* user) {
    auto* op = static_cast<operation*>(user);
    if (status == UCS_OK && info && info->length != op->size)
      status = UCS_ERR_MESSAGE_TRUNCATED;  // the peer sent less than its descriptor said
    op->owner->complete(*op, status);
  }

  // Caller holds `mutex`. Wakes the channel thread when it sleeps and has work: callbacks to
  // run, or transfers to drive.
  void wake_if_needed() {
    if (sleeping && (!ready.empty() || !ops.empty())) {
      sleeping = false;
      signal_thread();
    }
  }

  void signal_thread() {
    std::uint64_t one = 1;
    (void)!::write(wake_fd, &one, sizeof one);  // a full counter is a pending wake-up already
  }

  void report(operation& op, status outcome) {
    if (op.reported)
      return;
    op.reported = true;
    if (op.is_send && !outcome.ok())
      ++send_failures;
    if (op.is_send) {
      if (auto done = std::move(op.on_sent))
        ready.push_back([done = std::move(done), outcome = std::move(outcome)]() mutable { done(std::move(outcome)); });
    } else if (auto done = std::move(op.on_received)) {
      ready.push_back([done = std::move(done), outcome = std::move(outcome)]() mutable { done(std::move(outcome)); });
    }
  }

  void complete(operation& op, ucs_status_t status) {
    op.ucx_done = true;
    if (&op == inline_op) {  // inside the caller's start_receive: it reports the outcome itself
      op.inline_status = status;
      return;
    }
    if (status == UCS_OK)
      report(op, status::success());
    else
      report(op, ucx_error(op.is_send ? "send" : "receive", status));
  }

  // Caller holds `mutex`.
  void start_send(peer_id peer, std::uint64_t tag, const void* data, std::size_t size, std::shared_ptr<const void> keep,
                  send_done done, clock::time_point deadline) {
    auto fail = [&](error why) {
      ++send_failures;
      if (done)
        ready.push_back([done = std::move(done), why = std::move(why)]() mutable { done(std::move(why)); });
    };
    if (auto failed = failed_peers.find(peer); failed != failed_peers.end())
      return fail(make_error(error_code::io_error, failed->second));
    auto endpoint = endpoints.find(peer);
    if (endpoint == endpoints.end())
      return fail(make_error(error_code::invalid_argument, "UCX send: unknown peer " + std::to_string(peer)));
    auto& op = ops.emplace_back();
    op.owner = this;
    op.peer = peer;
    op.is_send = true;
    op.deadline = deadline;
    op.keep = std::move(keep);
    op.on_sent = std::move(done);
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    param.cb.send = &impl::on_send_complete;
    param.user_data = &op;
    auto* request = ucp_tag_send_nbx(endpoint->second, data, size, tag, &param);
    if (request == nullptr) {
      complete(op, UCS_OK);  // eager: the bytes are in UCX's hands already
      ops.pop_back();
    } else if (UCS_PTR_IS_ERR(request)) {
      complete(op, UCS_PTR_STATUS(request));
      ops.pop_back();
    } else {
      op.request = request;
    }
  }

  // Caller holds `mutex`.
  result<bool> start_receive(peer_id peer, std::uint64_t tag, void* dest, std::size_t size, std::shared_ptr<void> keep,
                             receive_into_done done, clock::time_point deadline) {
    if (auto failed = failed_peers.find(peer); failed != failed_peers.end())
      return make_error(error_code::io_error, failed->second);
    // Bytes that arrived since the channel thread last looked are matched now, in this call
    // (the thread does not wake for arrivals while nothing is pending). A few calls: one
    // takes a bounded number of shared-memory fragments.
    for (int turn = 0; turn < progress_per_turn && ucp_worker_progress(worker) != 0; ++turn) {
    }
    auto& op = ops.emplace_back();
    op.owner = this;
    op.peer = peer;
    op.size = size;
    op.deadline = deadline;
    op.keep = std::move(keep);
    op.on_received = std::move(done);
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    param.cb.recv = &impl::on_receive_complete;
    param.user_data = &op;
    // A message already here is probed first: the probe tells its length, which UCX 1.13
    // does not report for a receive that completes at once (only its callback gets it).
    ucp_tag_recv_info_t probed{};
    ucp_tag_message_h message = ucp_tag_probe_nb(worker, tag, ~std::uint64_t{0}, 1, &probed);
    inline_op = &op;
    void* request = nullptr;
    if (message) {
      request = ucp_tag_msg_recv_nbx(worker, dest, size, message, &param);
    } else {
      param.op_attr_mask |= UCP_OP_ATTR_FLAG_NO_IMM_CMPL;  // the callback, with the length, always runs
      request = ucp_tag_recv_nbx(worker, dest, size, tag, ~std::uint64_t{0}, &param);
    }
    inline_op = nullptr;
    if (UCS_PTR_IS_ERR(request)) {
      ops.pop_back();
      return ucx_error("receive", UCS_PTR_STATUS(request));
    }
    if (request == nullptr || op.ucx_done) {  // complete inside this call
      auto status = request == nullptr ? UCS_OK : op.inline_status;
      if (request)
        ucp_request_free(request);
      ops.pop_back();
      if (status == UCS_OK && message && probed.length != size)
        status = UCS_ERR_MESSAGE_TRUNCATED;
      if (status != UCS_OK)
        return ucx_error("receive", status);
      return true;
    }
    op.request = request;
    return false;
  }

  // Caller holds `mutex`.
  void fail_peer(peer_id peer, const std::string& reason) {
    for (auto& op : ops)
      if (op.peer == peer && !op.reported) {
        report(op, make_error(error_code::io_error, reason));
        if (op.request && !op.ucx_done && !op.is_send)
          ucp_request_cancel(worker, op.request);
      }
  }

  // Caller holds `mutex`. Times out what passed its deadline, frees what UCX is done with;
  // returns the time until the next deadline.
  std::chrono::milliseconds sweep() {
    auto now = clock::now();
    auto next = std::chrono::milliseconds{100};
    for (auto it = ops.begin(); it != ops.end();) {
      if (!it->reported && now >= it->deadline) {
        report(*it, make_error(error_code::io_error,
                               std::string("UCX ") + (it->is_send ? "send" : "receive") + ": timed out"));
        if (it->request && !it->ucx_done && !it->is_send)
          ucp_request_cancel(worker, it->request);
      }
      if (it->ucx_done) {
        if (it->request)
          ucp_request_free(it->request);
        it = ops.erase(it);
        continue;
      }
      if (!it->reported)
        next = std::min(next, std::chrono::duration_cast<std::chrono::milliseconds>(it->deadline - now) +
                                  std::chrono::milliseconds{1});
      ++it;
    }
    return std::max(next, std::chrono::milliseconds{0});
  }

  void run() {
    for (;;) {
      std::vector<std::function<void()>> callbacks;
      bool stop = false, spin = false, sleep = false, armed = false;
      auto wait = std::chrono::milliseconds{0};
      {
        std::lock_guard<std::mutex> guard{mutex};
        sleeping = false;
        auto polled_at = clock::time_point{clock::duration{last_poll.load(std::memory_order_relaxed)}};
        if (!stopping && clock::now() - polled_at < config.caller_poll_window) {
          // A caller drives the worker (poll()): a second thread spinning on the same worker
          // and lock would take half of its core on a small machine, and run the callbacks off
          // the caller's thread. Only the deadlines are this thread's then (their callbacks go
          // to the caller's next poll()); it looks again every millisecond without being
          // signalled (`sleeping` stays false), and takes over once the caller stops polling.
          sweep();
          sleep = true;
          wait = std::chrono::milliseconds{1};
        }
      }
      if (sleep) {
        pollfd fds[1] = {{wake_fd, POLLIN, 0}};
        ::poll(fds, 1, static_cast<int>(wait.count()));
        ++wakeups;
        std::uint64_t count = 0;
        if (fds[0].revents & POLLIN)
          (void)!::read(wake_fd, &count, sizeof count);
        continue;
      }
      {
        std::lock_guard<std::mutex> guard{mutex};
        sleeping = false;
        // A bounded number of progress calls per turn: a rendezvous stream progresses for as
        // long as fragments keep coming, and a caller that waits for the lock to post the
        // next send or receive would let the stream run dry.
        bool progressed = false, more = false;
        for (int turn = 0; turn < progress_per_turn && (more = ucp_worker_progress(worker) != 0); ++turn)
          progressed = true;
        auto now = clock::now();
        if (progressed)
          last_progress = now;
        wait = sweep();
        callbacks.swap(ready);
        stop = stopping;
        if (!stop && callbacks.empty()) {
          // Shared memory raises no wake-up for every protocol step (a rendezvous needs
          // several progress calls on both sides), so while transfers are pending the thread
          // polls for a short while (2 ms) before it sleeps: the core is spent only when
          // bytes are moving, and the next message of a burst does not pay a wake-up.
          if (more)
            spin = true;  // the yield lets a caller waiting for the lock have it
          else if (!ops.empty() && now - last_progress < spin_window)
            spin = true;
          else if (ops.empty()) {
            // Nothing pending: a message that arrives now waits in UCX until its receive is
            // posted, and that call progresses the worker itself. Unarmed, an arrival costs
            // no wake-up here and no signal at the sender (posix signals armed peers only).
            sleep = sleeping = true;
            armed = false;
          } else if (ucp_worker_arm(worker) == UCS_OK)
            sleep = sleeping = armed = true;
        }
      }
      for (auto& callback : callbacks)
        callback();
      if (stop)
        break;
      if (spin)
        std::this_thread::yield();
      else if (sleep) {
        pollfd fds[2] = {{wake_fd, POLLIN, 0}, {event_fd, POLLIN, 0}};
        ::poll(fds, armed ? 2 : 1, static_cast<int>(wait.count()));
        ++wakeups;
        std::uint64_t count = 0;
        if (fds[0].revents & POLLIN)
          (void)!::read(wake_fd, &count, sizeof count);
      }
    }
    // Shutting down: fail what is pending, let UCX finish or cancel, then free.
    std::vector<std::function<void()>> callbacks;
    {
      std::lock_guard<std::mutex> guard{mutex};
      for (auto& op : ops) {
        report(op, make_error(error_code::io_error, "UCX channel shut down"));
        if (op.request && !op.ucx_done && !op.is_send)
          ucp_request_cancel(worker, op.request);
      }
      for (int spins = 0; spins < 1000 && std::any_of(ops.begin(), ops.end(), [](auto& op) { return !op.ucx_done; });
           ++spins)
        ucp_worker_progress(worker);
      for (auto& op : ops)
        if (op.request && op.ucx_done)
          ucp_request_free(op.request);
      ops.clear();
      callbacks.swap(ready);
    }
    for (auto& callback : callbacks)
      callback();
  }

  ~impl() {
    if (thread.joinable()) {
      {
        std::lock_guard<std::mutex> guard{mutex};
        stopping = true;
      }
      signal_thread();
      thread.join();
    }
    if (wake_fd >= 0)
      ::close(wake_fd);
    for (auto& [peer, endpoint] : endpoints) {
      ucp_request_param_t param{};
      param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      param.flags = config.transport == ucx_transport::tcp ? UCP_EP_CLOSE_FLAG_FORCE : 0;
      auto* request = ucp_ep_close_nbx(endpoint, &param);
      if (UCS_PTR_IS_PTR(request)) {
        for (int spins = 0; spins < 100000 && ucp_request_check_status(request) == UCS_INPROGRESS; ++spins)
          ucp_worker_progress(worker);
        ucp_request_free(request);
      }
    }
    if (worker)
      ucp_worker_destroy(worker);
    if (context)
      ucp_cleanup(context);
  }
};

result<std::unique_ptr<ucx_channel>> ucx_channel::create(ucx_channel_config config) {
  if (config.max_message_bytes == 0 || config.pool_bytes < config.max_message_bytes)
    return make_error(error_code::invalid_argument, "UCX channel: pool_bytes must hold one max_message_bytes");
  auto state = std::make_unique<impl>();
  state->config = config;
  state->pool->capacity = config.pool_bytes;

  ucp_config_t* ucp_config = nullptr;
  if (auto status = ucp_config_read(nullptr, nullptr, &ucp_config); status != UCS_OK)
    return ucx_error("config", status);
  // posix alone has no peer-failure handling in 1.13 (platform.md §3.4): liveness comes from
  // CAF's monitors, and pending receives are cancelled by cancel_peer().
  ucp_config_modify(ucp_config, "TLS", config.transport == ucx_transport::tcp ? "tcp" : "posix");
  // Rendezvous above the eager limit only (UCX's "auto" picks 8 KiB here).
  std::string rndv_threshold = std::to_string(std::max<std::size_t>(config.eager_limit_bytes, 1));
  if (auto status = ucp_config_modify(ucp_config, "RNDV_THRESH", rndv_threshold.c_str()); status != UCS_OK) {
    ucp_config_release(ucp_config);
    return ucx_error("config RNDV_THRESH=" + rndv_threshold, status);
  }
  // UCX 1.13's newer protocol selection (v2, off by default in 1.13): a 1 MiB rendezvous
  // over posix took 440-565 us with v1 and 180-250 us with v2 in one measurement (two
  // channels in one process, one transfer at a time, load 9; moert_bench_transport has the
  // two-process figures). The cluster and transport tests pass with either.
  if (auto status = ucp_config_modify(ucp_config, "PROTO_ENABLE", "y"); status != UCS_OK) {
    ucp_config_release(ucp_config);
    return ucx_error("config PROTO_ENABLE=y", status);
  }
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_TAG | UCP_FEATURE_WAKEUP;
  auto status = ucp_init(&params, ucp_config, &state->context);
  ucp_config_release(ucp_config);
  if (status != UCS_OK)
    return ucx_error(std::string("init (") + to_string(config.transport) + ")", status);

  ucp_worker_params_t worker_params{};
  worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  // Callers and the channel thread take turns under impl::mutex.
  worker_params.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  if (status = ucp_worker_create(state->context, &worker_params, &state->worker); status != UCS_OK)
    return ucx_error("worker", status);
  if (status = ucp_worker_get_efd(state->worker, &state->event_fd); status != UCS_OK)
    return ucx_error("worker event fd", status);
  state->wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (state->wake_fd < 0)
    return make_error(error_code::io_error, std::string("UCX channel: eventfd: ") + std::strerror(errno));

  ucp_address_t* address = nullptr;
  std::size_t address_length = 0;
  if (status = ucp_worker_get_address(state->worker, &address, &address_length); status != UCS_OK)
    return ucx_error("worker address", status);
  std::string address_bytes(reinterpret_cast<const char*>(address), address_length);
  ucp_worker_release_address(state->worker, address);

  auto* raw = state.get();
  raw->thread = std::thread([raw] {
    ::pthread_setname_np(::pthread_self(), "ucx-channel");  // for top -H and perf
    raw->run();
  });
  std::unique_ptr<ucx_channel> channel{new ucx_channel(std::move(state))};
  channel->address_ = std::move(address_bytes);
  channel->config_ = config;
  return channel;
}

ucx_channel::ucx_channel(std::unique_ptr<impl> state) : impl_(std::move(state)) {}
ucx_channel::~ucx_channel() = default;

result<peer_id> ucx_channel::connect(const std::string& peer_address) {
  // A worker address is a few hundred bytes; anything far larger is not one.
  if (peer_address.empty() || peer_address.size() > 64 * 1024)
    return make_error(error_code::invalid_argument,
                      "UCX connect: a peer address of " + std::to_string(peer_address.size()) + " bytes");
  auto* state = impl_.get();
  std::lock_guard<std::mutex> guard{state->mutex};
  peer_id peer = state->next_peer++;
  auto& context = state->error_contexts.emplace_back(impl::endpoint_error_context{state, peer});
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  params.address = reinterpret_cast<const ucp_address_t*>(peer_address.data());
  if (config_.transport == ucx_transport::tcp) {
    params.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
    params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    params.err_handler.cb = &impl::on_endpoint_error;
    params.err_handler.arg = &context;
  } else {
    params.err_mode = UCP_ERR_HANDLING_MODE_NONE;
  }
  ucp_ep_h endpoint = nullptr;
  if (auto status = ucp_ep_create(state->worker, &params, &endpoint); status != UCS_OK)
    return ucx_error("connect", status);
  state->endpoints.emplace(peer, endpoint);
  return peer;
}

void ucx_channel::send(peer_id peer, std::uint64_t tag, std::shared_ptr<const std::vector<std::uint8_t>> bytes,
                       send_done done, std::chrono::milliseconds timeout) {
  const void* data = bytes->data();
  std::size_t size = bytes->size();
  send(peer, tag, data, size, std::move(bytes), std::move(done), timeout);
}

void ucx_channel::send(peer_id peer, std::uint64_t tag, const void* data, std::size_t size,
                       std::shared_ptr<const void> keep, send_done done, std::chrono::milliseconds timeout) {
  auto deadline = clock::now() + (timeout.count() > 0 ? timeout : config_.default_timeout);
  auto* state = impl_.get();
  std::lock_guard<std::mutex> guard{state->mutex};
  state->start_send(peer, tag, data, size, std::move(keep), std::move(done), deadline);
  state->wake_if_needed();
}

result<std::shared_ptr<void>> ucx_channel::reserve(std::size_t bytes) {
  if (bytes > config_.max_message_bytes)
    return make_error(error_code::invalid_argument, "UCX receive: " + std::to_string(bytes) +
                                                        " bytes announced, the limit is " +
                                                        std::to_string(config_.max_message_bytes));
  auto pool = impl_->pool;
  {
    std::lock_guard<std::mutex> guard{pool->mutex};
    if (pool->in_use + bytes > pool->capacity)
      return make_error(error_code::invalid_argument, "UCX receive: pool full (" + std::to_string(pool->in_use) +
                                                          " of " + std::to_string(pool->capacity) + " bytes held)");
    pool->in_use += bytes;
  }
  return std::shared_ptr<void>{nullptr, [pool, bytes](void*) { pool->release(bytes); }};
}

result<bool> ucx_channel::receive_into(peer_id peer, std::uint64_t tag, void* dest, std::size_t size,
                                       std::shared_ptr<void> keep, receive_into_done done,
                                       std::chrono::milliseconds timeout) {
  auto deadline = clock::now() + (timeout.count() > 0 ? timeout : config_.default_timeout);
  auto* state = impl_.get();
  std::lock_guard<std::mutex> guard{state->mutex};
  auto started = state->start_receive(peer, tag, dest, size, std::move(keep), std::move(done), deadline);
  state->wake_if_needed();
  return started;
}

void ucx_channel::receive(peer_id peer, std::uint64_t tag, std::size_t bytes, receive_done done,
                          std::chrono::milliseconds timeout) {
  auto* state = impl_.get();
  auto later = [state](std::function<void()> callback) {
    std::lock_guard<std::mutex> guard{state->mutex};
    state->ready.push_back(std::move(callback));
    state->wake_if_needed();
  };
  auto credit = reserve(bytes);
  if (!credit.ok())
    return later([done = std::move(done), why = credit.err()]() mutable { done(std::move(why)); });
  std::size_t capacity = 0;
  auto buffer = state->pool->take(bytes, capacity);
  auto* data = buffer.release();
  std::shared_ptr<std::uint8_t> storage{
      data, [pool = state->pool, capacity, credit = std::move(*credit)](std::uint8_t* bytes) mutable {
        pool->give_back(std::unique_ptr<std::uint8_t[]>(bytes), capacity);
        credit.reset();
      }};
  auto deliver = [done, storage, bytes](status outcome) mutable {
    if (outcome.ok())
      done(received_buffer{std::move(storage), bytes});
    else
      done(outcome.err());
  };
  auto now = receive_into(peer, tag, data, bytes, storage, deliver, timeout);
  if (!now.ok())
    return later([deliver, why = now.err()]() mutable { deliver(std::move(why)); });
  if (*now)
    later([deliver]() mutable { deliver(status::success()); });
}

std::size_t ucx_channel::poll() {
  auto* state = impl_.get();
  std::vector<std::function<void()>> callbacks;
  state->last_poll.store(clock::now().time_since_epoch().count(), std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> guard{state->mutex};
    for (int turn = 0; turn < impl::progress_per_turn && ucp_worker_progress(state->worker) != 0; ++turn)
      state->last_progress = clock::now();
    callbacks.swap(state->ready);
  }
  for (auto& callback : callbacks)
    callback();
  return callbacks.size();
}

void ucx_channel::cancel_peer(peer_id peer, std::string reason) {
  auto* state = impl_.get();
  std::lock_guard<std::mutex> guard{state->mutex};
  state->failed_peers.emplace(peer, reason);
  state->fail_peer(peer, reason);
  state->wake_if_needed();
}

std::size_t ucx_channel::pool_bytes_in_use() const {
  std::lock_guard<std::mutex> guard{impl_->pool->mutex};
  return impl_->pool->in_use;
}

std::uint64_t ucx_channel::send_failures() const { return impl_->send_failures; }

std::uint64_t ucx_channel::thread_wakeups() const { return impl_->wakeups; }

}  // namespace moert::transport
