#include "transport/nccl_channel.hpp"

#include "gpu/cuda/device.hpp"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

static_assert(sizeof(moert::transport::nccl_id) == sizeof(ncclUniqueId), "nccl_id must hold an ncclUniqueId");

namespace moert::transport {

namespace {

using clock_type = std::chrono::steady_clock;

error cuda_failure(const std::string& what, cudaError_t rc) {
  return make_error(error_code::device_error, what + ": " + cudaGetErrorString(rc));
}

error nccl_failure(const std::string& what, ncclResult_t rc, ncclComm_t comm) {
  std::string message = what + ": " + ncclGetErrorString(rc);
  if (comm != nullptr) {
    const char* last = ncclGetLastError(comm);
    if (last != nullptr && *last != '\0')
      message += std::string(" (") + last + ")";
  }
  return make_error(error_code::device_error, message);
}

struct transfer {
  std::uint64_t sequence = 0;
  void* data = nullptr;
  bool on_host = false;  // `data` is host memory: staged through `staging` (send_host / receive_host)
  void* staging = nullptr;  // device buffer, from cudaMallocAsync on the pipe's stream
  std::size_t bytes = 0;
  cudaEvent_t ready = nullptr;  // sends only: the producer's event
  nccl_channel::done finished;
  clock_type::time_point deadline;
  cudaEvent_t completed = nullptr;  // recorded behind the NCCL call once issued
};

enum class phase { requested, joining, ready, failed };

struct pipe_state {
  bool sender = false;
  nccl_id id{};
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  cudaStream_t copy_stream = nullptr;  // staged receives' copies down, waited on alone
  phase at = phase::requested;
  clock_type::time_point init_deadline;
  std::string failure;
  // Sender: the next sequence number to hand out. Receiver: the next one to issue.
  std::uint64_t next_sequence = 0;
  std::map<std::uint64_t, transfer> waiting;  // posted, not yet issued
  std::deque<transfer> issued;                // on the stream, in issue order
};

using callback_list = std::vector<std::pair<nccl_channel::done, status>>;

}  // namespace

result<nccl_id> make_nccl_id() {
  ncclUniqueId uid;
  ncclResult_t rc = ncclGetUniqueId(&uid);
  if (rc != ncclSuccess)
    return nccl_failure("ncclGetUniqueId", rc, nullptr);
  nccl_id id;
  std::memcpy(id.data(), &uid, sizeof uid);
  return id;
}

struct nccl_channel::impl {
  nccl_channel_config config;
  mutable std::mutex mutex;  // guards every member below except `thread` and `free_events`
  std::condition_variable wake;
  std::map<pipe_id, pipe_state> pipes;
  pipe_id next_pipe = 1;
  std::vector<std::pair<pipe_id, std::string>> cancels;
  callback_list deferred;  // callbacks decided inside a caller's call, run by the thread
  bool work = false;
  bool stopping = false;
  std::vector<cudaEvent_t> free_events;  // the thread's only
  std::thread thread;

  explicit impl(nccl_channel_config c) : config(c) {}

  void run();
  void step(pipe_state& pipe, clock_type::time_point now, callback_list& callbacks);
  void fail(pipe_state& pipe, const std::string& reason, callback_list& callbacks);
  result<cudaEvent_t> take_event();
  void give_event(cudaEvent_t event) { free_events.push_back(event); }

  // A non-blocking communicator's calls may return ncclInProgress: the call is done once the
  // communicator's async state leaves it (bounded by `deadline`).
  ncclResult_t settle(ncclComm_t comm, ncclResult_t rc, clock_type::time_point deadline) {
    while (rc == ncclInProgress) {
      if (clock_type::now() > deadline)
        return ncclInProgress;
      ncclResult_t state = ncclSuccess;
      ncclResult_t query = ncclCommGetAsyncError(comm, &state);
      rc = query != ncclSuccess ? query : state;
    }
    return rc;
  }
};

result<cudaEvent_t> nccl_channel::impl::take_event() {
  if (!free_events.empty()) {
    cudaEvent_t event = free_events.back();
    free_events.pop_back();
    return event;
  }
  cudaEvent_t event = nullptr;
  cudaError_t rc = cudaEventCreateWithFlags(&event, cudaEventDisableTiming);
  if (rc != cudaSuccess)
    return cuda_failure("cudaEventCreateWithFlags", rc);
  return event;
}

void nccl_channel::impl::fail(pipe_state& pipe, const std::string& reason, callback_list& callbacks) {
  if (pipe.at == phase::failed)
    return;
  pipe.at = phase::failed;
  pipe.failure = reason;
  if (pipe.comm != nullptr) {
    // Abort ends the communicator's kernels, so the stream drains and the callers' buffers
    // are free once their callbacks run.
    ncclCommAbort(pipe.comm);
    pipe.comm = nullptr;
  }
  if (pipe.stream != nullptr) {
    cudaStreamSynchronize(pipe.stream);
    for (transfer& t : pipe.issued)
      if (t.staging != nullptr)
        cudaFreeAsync(t.staging, pipe.stream);
    cudaStreamSynchronize(pipe.stream);
    cudaStreamDestroy(pipe.stream);
    pipe.stream = nullptr;
  }
  if (pipe.copy_stream != nullptr) {
    cudaStreamDestroy(pipe.copy_stream);
    pipe.copy_stream = nullptr;
  }
  status failed = make_error(error_code::device_error, reason);
  for (transfer& t : pipe.issued) {
    give_event(t.completed);
    callbacks.emplace_back(std::move(t.finished), failed);
  }
  pipe.issued.clear();
  for (auto& [sequence, t] : pipe.waiting)
    callbacks.emplace_back(std::move(t.finished), failed);
  pipe.waiting.clear();
}

void nccl_channel::impl::step(pipe_state& pipe, clock_type::time_point now, callback_list& callbacks) {
  const char* role = pipe.sender ? "send" : "receive";
  if (pipe.at == phase::requested) {
    cudaError_t crc = cudaStreamCreateWithFlags(&pipe.stream, cudaStreamNonBlocking);
    if (crc == cudaSuccess && !pipe.sender)
      crc = cudaStreamCreateWithFlags(&pipe.copy_stream, cudaStreamNonBlocking);
    if (crc != cudaSuccess)
      return fail(pipe, cuda_failure("nccl_channel: cudaStreamCreate on device " + std::to_string(config.device), crc)
                            .message,
                  callbacks);
    ncclConfig_t nccl_config = NCCL_CONFIG_INITIALIZER;
    nccl_config.blocking = 0;  // init must not hold the channel's thread: it waits for the peer
    ncclUniqueId uid;
    std::memcpy(&uid, pipe.id.data(), sizeof uid);
    ncclResult_t rc = ncclCommInitRankConfig(&pipe.comm, 2, uid, pipe.sender ? 0 : 1, &nccl_config);
    if (rc != ncclSuccess && rc != ncclInProgress)
      return fail(pipe, nccl_failure(std::string("nccl_channel: ncclCommInitRankConfig (") + role + " pipe)", rc,
                                     pipe.comm)
                            .message,
                  callbacks);
    pipe.at = phase::joining;
    pipe.init_deadline = now + config.init_timeout;
  }
  if (pipe.at == phase::joining) {
    ncclResult_t state = ncclSuccess;
    ncclResult_t rc = ncclCommGetAsyncError(pipe.comm, &state);
    if (rc == ncclSuccess)
      rc = state;
    if (rc == ncclInProgress) {
      if (now > pipe.init_deadline)
        return fail(pipe,
                    std::string("nccl_channel: the peer did not join the ") + role + " pipe within " +
                        std::to_string(config.init_timeout.count()) + " ms",
                    callbacks);
    } else if (rc != ncclSuccess) {
      return fail(pipe, nccl_failure(std::string("nccl_channel: joining the ") + role + " pipe", rc, pipe.comm).message,
                  callbacks);
    } else {
      pipe.at = phase::ready;
    }
  }
  // A transfer past its deadline breaks the pipe whatever its state: a lost message leaves
  // the two sides' sequences apart for good.
  auto late = [&](const transfer& t) { return now > t.deadline; };
  for (const auto& [sequence, t] : pipe.waiting)
    if (late(t))
      return fail(pipe, std::string("nccl_channel: ") + role + " of message " + std::to_string(sequence) +
                            " timed out (" + (pipe.at == phase::ready ? "its turn never came" : "pipe not joined") +
                            ")",
                  callbacks);
  for (const transfer& t : pipe.issued)
    if (late(t))
      return fail(pipe, std::string("nccl_channel: ") + role + " of message " + std::to_string(t.sequence) +
                            " (" + std::to_string(t.bytes) + " bytes) timed out: the peer did not match it",
                  callbacks);
  if (pipe.at != phase::ready)
    return;

  while (!pipe.waiting.empty() && (pipe.sender || pipe.waiting.begin()->first == pipe.next_sequence)) {
    auto node = pipe.waiting.extract(pipe.waiting.begin());
    transfer t = std::move(node.mapped());
    auto event = take_event();
    if (!event) {
      pipe.waiting.emplace(t.sequence, std::move(t));
      return fail(pipe, "nccl_channel: " + event.err().message, callbacks);
    }
    if (t.ready != nullptr) {
      cudaError_t crc = cudaStreamWaitEvent(pipe.stream, t.ready, 0);
      if (crc != cudaSuccess) {
        give_event(*event);
        pipe.waiting.emplace(t.sequence, std::move(t));
        return fail(pipe, cuda_failure("nccl_channel: cudaStreamWaitEvent on the producer's event", crc).message,
                    callbacks);
      }
    }
    void* device_data = t.data;
    if (t.on_host && t.bytes > 0) {
      // Stream-ordered: the buffer exists for the operations queued behind this call.
      cudaError_t crc = cudaMallocAsync(&t.staging, t.bytes, pipe.stream);
      // From pageable memory the copy up returns once the driver holds the bytes: it does not
      // wait for the transfers queued before it.
      if (crc == cudaSuccess && pipe.sender)
        crc = cudaMemcpyAsync(t.staging, t.data, t.bytes, cudaMemcpyHostToDevice, pipe.stream);
      if (crc != cudaSuccess) {
        if (t.staging != nullptr)
          cudaFreeAsync(t.staging, pipe.stream);
        t.staging = nullptr;
        give_event(*event);
        std::string what = "nccl_channel: staging message " + std::to_string(t.sequence) + " (" +
                           std::to_string(t.bytes) + " bytes) through device memory";
        pipe.waiting.emplace(t.sequence, std::move(t));
        return fail(pipe, cuda_failure(what, crc).message, callbacks);
      }
      device_data = t.staging;
    }
    ncclResult_t rc = pipe.sender ? ncclSend(device_data, t.bytes, ncclUint8, 1, pipe.comm, pipe.stream)
                                  : ncclRecv(device_data, t.bytes, ncclUint8, 0, pipe.comm, pipe.stream);
    rc = settle(pipe.comm, rc, t.deadline);
    cudaError_t crc = rc == ncclSuccess ? cudaEventRecord(*event, pipe.stream) : cudaSuccess;
    if (rc == ncclSuccess && crc == cudaSuccess && t.staging != nullptr && pipe.sender) {
      // A sent buffer is free once the send is done: in stream order, behind it.
      crc = cudaFreeAsync(t.staging, pipe.stream);
      t.staging = nullptr;
    }
    if (rc != ncclSuccess || crc != cudaSuccess) {
      if (t.staging != nullptr)
        cudaFreeAsync(t.staging, pipe.stream);
      t.staging = nullptr;
      give_event(*event);
      std::string what = std::string("nccl_channel: ") + (pipe.sender ? "ncclSend" : "ncclRecv") + " of message " +
                         std::to_string(t.sequence);
      pipe.waiting.emplace(t.sequence, std::move(t));
      return fail(pipe, rc != ncclSuccess ? nccl_failure(what, rc, pipe.comm).message : cuda_failure(what, crc).message,
                  callbacks);
    }
    t.completed = *event;
    if (!pipe.sender)
      ++pipe.next_sequence;
    pipe.issued.push_back(std::move(t));
  }

  while (!pipe.issued.empty()) {
    transfer& front = pipe.issued.front();
    cudaError_t crc = cudaEventQuery(front.completed);
    if (crc == cudaErrorNotReady)
      break;
    if (crc != cudaSuccess)
      return fail(pipe, cuda_failure("nccl_channel: message " + std::to_string(front.sequence), crc).message,
                  callbacks);
    if (front.staging != nullptr) {
      // A staged receive: its bytes are in the device buffer now. The copy down runs on the
      // pipe's copy stream, where nothing waits for a peer, so waiting for it is bounded by
      // the copy itself.
      crc = cudaMemcpyAsync(front.data, front.staging, front.bytes, cudaMemcpyDeviceToHost, pipe.copy_stream);
      if (crc == cudaSuccess)
        crc = cudaStreamSynchronize(pipe.copy_stream);
      if (crc == cudaSuccess)
        crc = cudaFreeAsync(front.staging, pipe.copy_stream);
      if (crc != cudaSuccess)
        return fail(pipe, cuda_failure("nccl_channel: copying message " + std::to_string(front.sequence) +
                                           " down to host memory", crc).message,
                    callbacks);
      front.staging = nullptr;
    }
    give_event(front.completed);
    callbacks.emplace_back(std::move(front.finished), status::success());
    pipe.issued.pop_front();
  }
  if (!pipe.issued.empty()) {
    // A peer that died or aborted shows up here, not in the event.
    ncclResult_t state = ncclSuccess;
    ncclResult_t rc = ncclCommGetAsyncError(pipe.comm, &state);
    if (rc == ncclSuccess)
      rc = state;
    if (rc != ncclSuccess && rc != ncclInProgress)
      return fail(pipe, nccl_failure(std::string("nccl_channel: ") + role + " pipe", rc, pipe.comm).message,
                  callbacks);
  }
}

void nccl_channel::impl::run() {
  cudaError_t set = cudaSetDevice(config.device);
  for (;;) {
    callback_list callbacks;
    bool stop = false;
    {
      std::unique_lock lock{mutex};
      bool busy = false;
      for (const auto& [id, pipe] : pipes)
        busy = busy || !pipe.issued.empty() || pipe.at == phase::joining || pipe.at == phase::requested;
      // Polling while transfers are on the GPU (an event has no callback that would wake a
      // condition variable without a host thread of CUDA's own); idle, wake for new work and
      // for deadlines.
      wake.wait_for(lock, busy ? std::chrono::microseconds{20} : std::chrono::microseconds{2000},
                    [&] { return work || stopping; });
      work = false;
      stop = stopping;
      callbacks.swap(deferred);
      auto now = clock_type::now();
      for (auto& [id, reason] : cancels) {
        auto it = pipes.find(id);
        if (it != pipes.end())
          fail(it->second, reason, callbacks);
      }
      cancels.clear();
      for (auto& [id, pipe] : pipes) {
        if (stop) {
          fail(pipe, "nccl_channel closed", callbacks);
        } else if (set != cudaSuccess) {
          fail(pipe, cuda_failure("nccl_channel: cudaSetDevice(" + std::to_string(config.device) + ")", set).message,
               callbacks);
        } else if (pipe.at != phase::failed) {
          step(pipe, now, callbacks);
        }
      }
    }
    for (auto& [finished, outcome] : callbacks)
      if (finished)
        finished(std::move(outcome));
    if (stop)
      break;
  }
  for (cudaEvent_t event : free_events)
    cudaEventDestroy(event);
  free_events.clear();
}

result<std::unique_ptr<nccl_channel>> nccl_channel::create(nccl_channel_config config) {
  auto count = cuda::device_count();
  if (!count)
    return make_error(error_code::device_error,
                      "nccl_channel on CUDA device " + std::to_string(config.device) + ": " + count.err().message);
  if (config.device < 0 || config.device >= *count)
    return make_error(error_code::device_error, "nccl_channel: CUDA device " + std::to_string(config.device) +
                                                    " does not exist (" + std::to_string(*count) + " devices)");
  if (config.default_timeout.count() <= 0 || config.init_timeout.count() <= 0)
    return make_error(error_code::invalid_argument, "nccl_channel: timeouts must be positive");
  auto state = std::make_unique<impl>(config);
  impl* raw = state.get();
  raw->thread = std::thread([raw] { raw->run(); });
  return std::unique_ptr<nccl_channel>(new nccl_channel(std::move(state), config));
}

nccl_channel::nccl_channel(std::unique_ptr<impl> state, nccl_channel_config config)
    : impl_(std::move(state)), config_(config) {}

nccl_channel::~nccl_channel() {
  {
    std::lock_guard lock{impl_->mutex};
    impl_->stopping = true;
  }
  impl_->wake.notify_all();
  impl_->thread.join();
}

result<pipe_id> nccl_channel::open_send(const nccl_id& id) {
  std::lock_guard lock{impl_->mutex};
  pipe_id pipe = impl_->next_pipe++;
  pipe_state& state = impl_->pipes[pipe];
  state.sender = true;
  state.id = id;
  impl_->work = true;
  impl_->wake.notify_all();
  return pipe;
}

result<pipe_id> nccl_channel::open_receive(const nccl_id& id) {
  std::lock_guard lock{impl_->mutex};
  pipe_id pipe = impl_->next_pipe++;
  pipe_state& state = impl_->pipes[pipe];
  state.sender = false;
  state.id = id;
  impl_->work = true;
  impl_->wake.notify_all();
  return pipe;
}

result<std::uint64_t> nccl_channel::send(pipe_id pipe, const void* data, std::size_t bytes, CUevent_st* ready,
                                         done finished, std::chrono::milliseconds timeout) {
  return post_send(pipe, data, false, bytes, ready, std::move(finished), timeout);
}

result<std::uint64_t> nccl_channel::send_host(pipe_id pipe, const void* host, std::size_t bytes, done finished,
                                              std::chrono::milliseconds timeout) {
  return post_send(pipe, host, true, bytes, nullptr, std::move(finished), timeout);
}

void nccl_channel::receive(pipe_id pipe, std::uint64_t sequence, void* data, std::size_t bytes, done finished,
                           std::chrono::milliseconds timeout) {
  post_receive(pipe, sequence, data, false, bytes, std::move(finished), timeout);
}

void nccl_channel::receive_host(pipe_id pipe, std::uint64_t sequence, void* host, std::size_t bytes, done finished,
                                std::chrono::milliseconds timeout) {
  post_receive(pipe, sequence, host, true, bytes, std::move(finished), timeout);
}

result<std::uint64_t> nccl_channel::post_send(pipe_id pipe, const void* data, bool on_host, std::size_t bytes,
                                              CUevent_st* ready, done finished, std::chrono::milliseconds timeout) {
  std::lock_guard lock{impl_->mutex};
  auto it = impl_->pipes.find(pipe);
  if (it == impl_->pipes.end() || !it->second.sender)
    return make_error(error_code::invalid_argument, "nccl_channel: pipe " + std::to_string(pipe) +
                                                        " is not a sending pipe of this channel");
  pipe_state& state = it->second;
  if (state.at == phase::failed)
    return make_error(error_code::device_error, state.failure);
  transfer t;
  t.sequence = state.next_sequence++;
  t.data = const_cast<void*>(data);  // ncclSend (or the copy up) only reads it
  t.on_host = on_host;
  t.bytes = bytes;
  t.ready = ready;
  t.finished = std::move(finished);
  t.deadline = clock_type::now() + (timeout.count() > 0 ? timeout : impl_->config.default_timeout);
  std::uint64_t sequence = t.sequence;
  state.waiting.emplace(sequence, std::move(t));
  impl_->work = true;
  impl_->wake.notify_all();
  return sequence;
}

void nccl_channel::post_receive(pipe_id pipe, std::uint64_t sequence, void* data, bool on_host, std::size_t bytes,
                                done finished, std::chrono::milliseconds timeout) {
  std::lock_guard lock{impl_->mutex};
  auto refuse = [&](std::string reason) {
    impl_->deferred.emplace_back(std::move(finished), make_error(error_code::invalid_argument, std::move(reason)));
  };
  auto it = impl_->pipes.find(pipe);
  if (it == impl_->pipes.end() || it->second.sender) {
    refuse("nccl_channel: pipe " + std::to_string(pipe) + " is not a receiving pipe of this channel");
  } else if (it->second.at == phase::failed) {
    impl_->deferred.emplace_back(std::move(finished), make_error(error_code::device_error, it->second.failure));
  } else if (sequence < it->second.next_sequence || it->second.waiting.count(sequence) != 0) {
    refuse("nccl_channel: message " + std::to_string(sequence) + " of pipe " + std::to_string(pipe) +
           " was already received or posted");
  } else {
    transfer t;
    t.sequence = sequence;
    t.data = data;
    t.on_host = on_host;
    t.bytes = bytes;
    t.finished = std::move(finished);
    t.deadline = clock_type::now() + (timeout.count() > 0 ? timeout : impl_->config.default_timeout);
    it->second.waiting.emplace(sequence, std::move(t));
  }
  impl_->work = true;
  impl_->wake.notify_all();
}

void nccl_channel::cancel_peer(pipe_id pipe, std::string reason) {
  {
    std::lock_guard lock{impl_->mutex};
    impl_->cancels.emplace_back(pipe, std::move(reason));
    impl_->work = true;
  }
  impl_->wake.notify_all();
}

bool nccl_channel::ready(pipe_id pipe) const {
  std::lock_guard lock{impl_->mutex};
  auto it = impl_->pipes.find(pipe);
  return it != impl_->pipes.end() && it->second.at == phase::ready;
}

// -- pipes for tensor_link ------------------------------------------------------------------

namespace {

class nccl_pipes final : public pipe_transport {
public:
  explicit nccl_pipes(std::unique_ptr<nccl_channel> channel) : channel_(std::move(channel)) {}

  std::string name() const override { return "nccl on CUDA device " + std::to_string(channel_->device()); }
  result<pipe_key> make_key() override { return make_nccl_id(); }
  result<pipe_id> open_send(const pipe_key& key) override { return channel_->open_send(key); }
  result<pipe_id> open_receive(const pipe_key& key) override { return channel_->open_receive(key); }

  result<std::uint64_t> send(pipe_id pipe, std::shared_ptr<const std::vector<std::uint8_t>> bytes,
                             done finished) override {
    const void* data = bytes->data();
    std::size_t size = bytes->size();
    // The callback holds the bytes until the copy up is done and NCCL has sent them.
    return channel_->send_host(pipe, data, size, [bytes = std::move(bytes), finished = std::move(finished)](status s) {
      if (finished)
        finished(std::move(s));
    });
  }
  void receive(pipe_id pipe, std::uint64_t sequence, void* dest, std::size_t num_bytes, done finished) override {
    channel_->receive_host(pipe, sequence, dest, num_bytes, std::move(finished));
  }
  void cancel(pipe_id pipe, std::string reason) override { channel_->cancel_peer(pipe, std::move(reason)); }

private:
  std::unique_ptr<nccl_channel> channel_;
};

}  // namespace

result<std::unique_ptr<pipe_transport>> make_nccl_pipes(nccl_channel_config config) {
  auto channel = nccl_channel::create(config);
  if (!channel)
    return channel.err();
  return std::unique_ptr<pipe_transport>(std::make_unique<nccl_pipes>(std::move(*channel)));
}

}  // namespace moert::transport
