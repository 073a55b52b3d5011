#include "transport/ucx_channel.hpp"

#include <ucp/api/ucp.h>

#include <poll.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <list>
#include <mutex>
#include <thread>
#include <unordered_map>

namespace moert::transport {
namespace {

using clock = std::chrono::steady_clock;

error ucx_error(const std::string& what, ucs_status_t status) {
  return make_error(error_code::io_error, "UCX " + what + ": " + ucs_status_string(status));
}

// Pool accounting outlives the channel: a received_buffer may be released after it.
struct pool_state {
  std::mutex mutex;
  std::size_t in_use = 0;
  std::size_t capacity = 0;
};

}  // namespace

const char* to_string(ucx_transport transport) {
  return transport == ucx_transport::tcp ? "ucx-tcp" : "ucx-posix";
}

struct ucx_channel::impl {
  // One send or receive in flight. Lives in `ops` until UCX is done with its buffer, which
  // can be after its caller was told of a timeout.
  struct operation {
    ucx_channel::impl* owner = nullptr;
    peer_id peer = 0;
    bool is_send = false;
    void* request = nullptr;  // UCX's, until it completes
    clock::time_point deadline;
    bool reported = false;    // the caller's callback has run
    bool ucx_done = false;
    std::shared_ptr<const std::vector<std::uint8_t>> send_bytes;
    std::vector<std::uint8_t> receive_bytes;
    std::shared_ptr<void> credit;
    send_done on_sent;
    receive_done on_received;
  };

  ucx_channel_config config;
  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;
  int event_fd = -1;
  std::shared_ptr<pool_state> pool = std::make_shared<pool_state>();

  std::mutex mutex;  // guards commands, stopping and endpoints (endpoints: creation only)
  std::vector<std::function<void()>> commands;
  bool stopping = false;
  std::unordered_map<peer_id, ucp_ep_h> endpoints;
  peer_id next_peer = 1;

  struct endpoint_error_context {
    impl* owner;
    peer_id peer;
  };
  static constexpr std::chrono::microseconds spin_window{2000};
  clock::time_point last_progress;                      // channel thread only
  std::list<operation> ops;                             // channel thread only
  std::list<endpoint_error_context> error_contexts;     // channel thread only; stable addresses
  std::unordered_map<peer_id, std::string> failed_peers;  // channel thread only

  // tcp's peer-failure handler: the peer's process is gone or unreachable.
  static void on_endpoint_error(void* arg, ucp_ep_h, ucs_status_t status) {
    auto* context = static_cast<endpoint_error_context*>(arg);
    std::string reason = std::string("UCX peer ") + std::to_string(context->peer) + " failed: " + ucs_status_string(status);
    context->owner->failed_peers.emplace(context->peer, reason);
    context->owner->fail_peer(context->peer, reason);
  }
  std::thread thread;

  void post(std::function<void()> command) {
    {
      std::lock_guard<std::mutex> guard{mutex};
      commands.push_back(std::move(command));
    }
    ucp_worker_signal(worker);
  }

  static void on_send_complete(void* request, ucs_status_t status, void* user) {
    auto* op = static_cast<operation*>(user);
    op->owner->complete(*op, status);
  }
  static void on_receive_complete(void* request, ucs_status_t status, const ucp_tag_recv_info_t* info,
                                  void* user) {
    auto* op = static_cast<operation*>(user);
    if (status == UCS_OK && info && info->length != op->receive_bytes.size())
      status = UCS_ERR_MESSAGE_TRUNCATED;  // the peer sent less than its descriptor said
    op->owner->complete(*op, status);
  }

  void report(operation& op, status outcome) {
    if (op.reported)
      return;
    op.reported = true;
    if (op.is_send) {
      auto done = std::move(op.on_sent);
      if (done)
        done(std::move(outcome));
    } else {
      auto done = std::move(op.on_received);
      if (!done)
        return;
      if (outcome.ok())
        done(received_buffer{std::move(op.receive_bytes), std::move(op.credit)});
      else
        done(outcome.err());
    }
  }

  void complete(operation& op, ucs_status_t status) {
    op.ucx_done = true;
    if (status == UCS_OK)
      report(op, status::success());
    else
      report(op, ucx_error(op.is_send ? "send" : "receive", status));
  }

  void start_send(peer_id peer, std::uint64_t tag, std::shared_ptr<const std::vector<std::uint8_t>> bytes,
                  send_done done, clock::time_point deadline) {
    auto& op = ops.emplace_back();
    op.owner = this;
    op.peer = peer;
    op.is_send = true;
    op.deadline = deadline;
    op.send_bytes = std::move(bytes);
    op.on_sent = std::move(done);
    ucp_ep_h endpoint = nullptr;
    {
      std::lock_guard<std::mutex> guard{mutex};
      auto it = endpoints.find(peer);
      if (it != endpoints.end())
        endpoint = it->second;
    }
    if (auto failed = failed_peers.find(peer); failed != failed_peers.end()) {
      op.ucx_done = true;
      report(op, make_error(error_code::io_error, failed->second));
      return;
    }
    if (!endpoint) {
      op.ucx_done = true;
      report(op, make_error(error_code::invalid_argument, "UCX send: unknown peer " + std::to_string(peer)));
      return;
    }
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    param.cb.send = &impl::on_send_complete;
    param.user_data = &op;
    auto* request = ucp_tag_send_nbx(endpoint, op.send_bytes->data(), op.send_bytes->size(), tag, &param);
    if (request == nullptr)
      complete(op, UCS_OK);
    else if (UCS_PTR_IS_ERR(request))
      complete(op, UCS_PTR_STATUS(request));
    else
      op.request = request;
  }

  void start_receive(peer_id peer, std::uint64_t tag, std::size_t bytes, std::shared_ptr<void> credit,
                     receive_done done, clock::time_point deadline) {
    auto& op = ops.emplace_back();
    op.owner = this;
    op.peer = peer;
    op.deadline = deadline;
    op.receive_bytes.resize(bytes);
    op.credit = std::move(credit);
    op.on_received = std::move(done);
    if (auto failed = failed_peers.find(peer); failed != failed_peers.end()) {
      op.ucx_done = true;
      report(op, make_error(error_code::io_error, failed->second));
      return;
    }
    ucp_request_param_t param{};
    // No immediate completion: UCX 1.13 does not fill recv_info then, and the length check
    // against the descriptor needs it. The callback always runs, on this thread.
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    param.cb.recv = &impl::on_receive_complete;
    param.user_data = &op;
    auto* request = ucp_tag_recv_nbx(worker, op.receive_bytes.data(), bytes, tag, ~std::uint64_t{0}, &param);
    if (UCS_PTR_IS_ERR(request))
      complete(op, UCS_PTR_STATUS(request));
    else
      op.request = request;
  }

  void fail_peer(peer_id peer, const std::string& reason) {
    for (auto& op : ops)
      if (op.peer == peer && !op.reported) {
        report(op, make_error(error_code::io_error, reason));
        if (op.request && !op.ucx_done && !op.is_send)
          ucp_request_cancel(worker, op.request);
      }
  }

  // Times out what passed its deadline, frees what UCX is done with; returns the time until
  // the next deadline.
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
      std::vector<std::function<void()>> batch;
      bool stop = false;
      {
        std::lock_guard<std::mutex> guard{mutex};
        batch.swap(commands);
        stop = stopping;
      }
      for (auto& command : batch)
        command();
      bool progressed = false;
      while (ucp_worker_progress(worker) != 0)
        progressed = true;
      if (progressed)
        last_progress = clock::now();
      auto wait = sweep();
      if (stop)
        break;
      // Shared memory raises no wake-up for every protocol step (a rendezvous needs several
      // progress calls on both sides), so while transfers are pending the thread polls for
      // a short while (2 ms) before it sleeps: the core is spent only when bytes are moving, and
  // the next message of a burst does not pay a wake-up (4 KiB one-way 78 -> 16-22 us here).
      if (!ops.empty() && clock::now() - last_progress < spin_window) {
        std::this_thread::yield();
        continue;
      }
      auto armed = ucp_worker_arm(worker);
      if (armed == UCS_ERR_BUSY)
        continue;
      pollfd fd{event_fd, POLLIN, 0};
      ::poll(&fd, 1, static_cast<int>(wait.count()));
    }
    // Shutting down: fail what is pending, let UCX finish or cancel, then free.
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
  }

  ~impl() {
    if (thread.joinable()) {
      {
        std::lock_guard<std::mutex> guard{mutex};
        stopping = true;
      }
      ucp_worker_signal(worker);
      thread.join();
    }
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
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_TAG | UCP_FEATURE_WAKEUP;
  auto status = ucp_init(&params, ucp_config, &state->context);
  ucp_config_release(ucp_config);
  if (status != UCS_OK)
    return ucx_error(std::string("init (") + to_string(config.transport) + ")", status);

  ucp_worker_params_t worker_params{};
  worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  worker_params.thread_mode = UCS_THREAD_MODE_SINGLE;  // only the channel thread drives it
  if (status = ucp_worker_create(state->context, &worker_params, &state->worker); status != UCS_OK)
    return ucx_error("worker", status);
  if (status = ucp_worker_get_efd(state->worker, &state->event_fd); status != UCS_OK)
    return ucx_error("worker event fd", status);

  ucp_address_t* address = nullptr;
  std::size_t address_length = 0;
  if (status = ucp_worker_get_address(state->worker, &address, &address_length); status != UCS_OK)
    return ucx_error("worker address", status);
  std::string address_bytes(reinterpret_cast<const char*>(address), address_length);
  ucp_worker_release_address(state->worker, address);

  auto* raw = state.get();
  raw->thread = std::thread([raw] { raw->run(); });
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
  // Endpoint creation touches the worker: run it on the channel thread and wait (bounded).
  struct outcome {
    std::mutex mutex;
    std::condition_variable done;
    bool finished = false;
    ucs_status_t status = UCS_OK;
    peer_id peer = 0;
  };
  auto result_state = std::make_shared<outcome>();
  auto* state = impl_.get();
  state->post([state, peer_address, result_state] {
    ucp_ep_params_t params{};
    peer_id peer = 0;
    {
      std::lock_guard<std::mutex> guard{state->mutex};
      peer = state->next_peer++;
    }
    auto& context = state->error_contexts.emplace_back(impl::endpoint_error_context{state, peer});
    params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    params.address = reinterpret_cast<const ucp_address_t*>(peer_address.data());
    if (state->config.transport == ucx_transport::tcp) {
      params.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
      params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
      params.err_handler.cb = &impl::on_endpoint_error;
      params.err_handler.arg = &context;
    } else {
      params.err_mode = UCP_ERR_HANDLING_MODE_NONE;
    }
    ucp_ep_h endpoint = nullptr;
    auto status = ucp_ep_create(state->worker, &params, &endpoint);
    std::lock_guard<std::mutex> guard{result_state->mutex};
    result_state->status = status;
    if (status == UCS_OK) {
      std::lock_guard<std::mutex> endpoints_guard{state->mutex};
      result_state->peer = peer;
      state->endpoints.emplace(peer, endpoint);
    }
    result_state->finished = true;
    result_state->done.notify_all();
  });
  std::unique_lock<std::mutex> lock{result_state->mutex};
  if (!result_state->done.wait_for(lock, config_.default_timeout, [&] { return result_state->finished; }))
    return make_error(error_code::io_error, "UCX connect: timed out");
  if (result_state->status != UCS_OK)
    return ucx_error("connect", result_state->status);
  return result_state->peer;
}

void ucx_channel::send(peer_id peer, std::uint64_t tag, std::shared_ptr<const std::vector<std::uint8_t>> bytes,
                       send_done done, std::chrono::milliseconds timeout) {
  auto deadline = clock::now() + (timeout.count() > 0 ? timeout : config_.default_timeout);
  auto* state = impl_.get();
  state->post([state, peer, tag, bytes = std::move(bytes), done = std::move(done), deadline]() mutable {
    state->start_send(peer, tag, std::move(bytes), std::move(done), deadline);
  });
}

void ucx_channel::receive(peer_id peer, std::uint64_t tag, std::size_t bytes, receive_done done,
                          std::chrono::milliseconds timeout) {
  auto* state = impl_.get();
  auto refuse = [&](std::string why) {
    state->post([done = std::move(done), why = std::move(why)] { done(make_error(error_code::invalid_argument, why)); });
  };
  if (bytes > config_.max_message_bytes)
    return refuse("UCX receive: " + std::to_string(bytes) + " bytes announced, the limit is " +
                  std::to_string(config_.max_message_bytes));
  {
    std::lock_guard<std::mutex> guard{state->pool->mutex};
    if (state->pool->in_use + bytes > state->pool->capacity)
      return refuse("UCX receive: pool full (" + std::to_string(state->pool->in_use) + " of " +
                    std::to_string(state->pool->capacity) + " bytes held)");
    state->pool->in_use += bytes;
  }
  std::shared_ptr<void> credit{nullptr, [pool = state->pool, bytes](void*) {
                                 std::lock_guard<std::mutex> guard{pool->mutex};
                                 pool->in_use -= bytes;
                               }};
  auto deadline = clock::now() + (timeout.count() > 0 ? timeout : config_.default_timeout);
  state->post([state, peer, tag, bytes, credit = std::move(credit), done = std::move(done), deadline]() mutable {
    state->start_receive(peer, tag, bytes, std::move(credit), std::move(done), deadline);
  });
}

void ucx_channel::cancel_peer(peer_id peer, std::string reason) {
  auto* state = impl_.get();
  state->post([state, peer, reason = std::move(reason)] {
    state->failed_peers.emplace(peer, reason);
    state->fail_peer(peer, reason);
  });
}

std::size_t ucx_channel::pool_bytes_in_use() const {
  std::lock_guard<std::mutex> guard{impl_->pool->mutex};
  return impl_->pool->in_use;
}

}  // namespace moert::transport
