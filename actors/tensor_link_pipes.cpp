// tensor_link's pipe half: the GPU row path of cluster transport "nccl" (tensor_link.hpp says
// how it works). The UCX half is tensor_link.cpp.

#include "actors/tensor_link.hpp"

#ifdef MOERT_HAVE_NCCL
#include "transport/nccl_channel.hpp"
#endif

#include <spdlog/spdlog.h>

namespace moert::actors {

namespace {

// A descriptor's byte count is the peer's word: a block larger than this is refused before
// anything is allocated (the UCX half bounds it by its pool's credit instead).
constexpr std::uint64_t max_pipe_message_bytes = std::uint64_t{256} << 20;

template <class Message>
bool fits(const Message& msg, std::size_t num_rows);
template <>
bool fits(const routed_tokens& msg, std::size_t num_rows) {
  return wire::routes_fit(msg, num_rows);
}
template <>
bool fits(const expert_outputs& msg, std::size_t num_rows) {
  return wire::entries_fit(msg, num_rows);
}

}  // namespace

std::unique_ptr<tensor_link> tensor_link::create_with_pipes(std::unique_ptr<transport::pipe_transport> pipes) {
  return std::unique_ptr<tensor_link>(new tensor_link(std::move(pipes)));
}

result<std::unique_ptr<tensor_link>> tensor_link::create_nccl(int device) {
#ifdef MOERT_HAVE_NCCL
  transport::nccl_channel_config config;
  config.device = device;
  auto pipes = transport::make_nccl_pipes(config);
  if (!pipes)
    return make_error(pipes.err().code, "cluster transport nccl: " + pipes.err().message);
  return create_with_pipes(std::move(*pipes));
#else
  (void)device;
  return make_error(error_code::unsupported,
                    "cluster transport nccl: this build has no NCCL (configure with -DMOERT_WITH_CUDA=ON where nvcc, "
                    "cuBLAS and NCCL are installed)");
#endif
}

result<transport::pipe_key> tensor_link::open_send_to(const caf::node_id& node) {
  if (!pipes_)
    return make_error(error_code::invalid_argument, "tensor link: pipes asked of a UCX link");
  auto key = pipes_->make_key();
  if (!key)
    return key.err();
  auto pipe = pipes_->open_send(*key);
  if (!pipe)
    return pipe.err();
  std::lock_guard<std::mutex> guard{mutex_};
  auto& pair = pipe_peers_[node];
  if (pair.send != 0)
    return make_error(error_code::invalid_argument, "tensor link: a second sending pipe to node " + to_string(node));
  pair.send = *pipe;
  return *key;
}

status tensor_link::open_receive_from(const caf::node_id& node, const transport::pipe_key& key) {
  if (!pipes_)
    return make_error(error_code::invalid_argument, "tensor link: pipes asked of a UCX link");
  auto pipe = pipes_->open_receive(key);
  if (!pipe)
    return pipe.err();
  std::lock_guard<std::mutex> guard{mutex_};
  auto& pair = pipe_peers_[node];
  if (pair.receive != 0)
    return make_error(error_code::invalid_argument,
                      "tensor link: a second receiving pipe from node " + to_string(node));
  pair.receive = *pipe;
  return status::success();
}

tensor_link::pipe_pair tensor_link::pipes_of(const caf::node_id& node) const {
  std::lock_guard<std::mutex> guard{mutex_};
  auto it = pipe_peers_.find(node);
  return it == pipe_peers_.end() ? pipe_pair{} : it->second;
}

namespace {

// Both message kinds alike.
template <class Message>
struct pipe_ops {
  static void send(transport::pipe_transport& pipes, transport::pipe_id pipe,
                   caf::event_based_actor* self, const caf::actor& dest, Message msg,
                   std::shared_ptr<const std::vector<std::uint8_t>> bytes, std::atomic<std::uint64_t>& fallbacks,
                   std::atomic<std::uint64_t>& shipped_bytes, std::atomic<std::uint64_t>& shipped_messages,
                   const std::function<void(const std::string&)>& warn) {
    auto row_floats = std::uint32_t(msg.rows->row_floats);
    std::size_t size = bytes->size();
    auto sequence = pipe == 0 ? result<std::uint64_t>(make_error(error_code::io_error, "no pipe to that node"))
                              : pipes.send(pipe, bytes, [warn](status sent) {
                                  if (!sent.ok())
                                    warn("rows lost on their pipe: " + sent.err().message);
                                });
    if (!sequence) {
      // The rows the descriptor would have named, in the message itself: slower, still correct.
      warn("a pipe failed (" + sequence.err().message + "): rows travel in CAF messages from now on");
      ++fallbacks;
      std::size_t num_rows = 0;
      msg.rows = wire::unpack_rows(row_floats, *bytes, num_rows);
      msg.wire = {};
      self->send(dest, std::move(msg));
      return;
    }
    msg.wire = {*sequence + 1, size, row_floats};
    msg.rows = nullptr;
    shipped_bytes += size;
    ++shipped_messages;
    self->send(dest, std::move(msg));
  }
};

}  // namespace

void tensor_link::pipe_send(caf::event_based_actor* self, const caf::actor& dest, routed_tokens msg,
                            std::shared_ptr<const std::vector<std::uint8_t>> bytes) {
  pipe_ops<routed_tokens>::send(*pipes_, pipes_of(dest.node()).send, self, dest, std::move(msg),
                                std::move(bytes), pipe_fallbacks_, bytes_shipped_, messages_shipped_,
                                [this](const std::string& what) { warn_once(what); });
}

void tensor_link::pipe_send(caf::event_based_actor* self, const caf::actor& dest, expert_outputs msg,
                            std::shared_ptr<const std::vector<std::uint8_t>> bytes) {
  pipe_ops<expert_outputs>::send(*pipes_, pipes_of(dest.node()).send, self, dest, std::move(msg),
                                 std::move(bytes), pipe_fallbacks_, bytes_shipped_, messages_shipped_,
                                 [this](const std::string& what) { warn_once(what); });
}

namespace {

template <class Message>
bool fetch_by_pipe(caf::event_based_actor* self, Message& msg, transport::pipe_transport& pipes,
                   transport::pipe_id pipe, const std::function<std::shared_ptr<row_block>(std::size_t, std::size_t)>& acquire,
                   const std::function<void(const std::string&)>& warn) {
  wire_descriptor wire = msg.wire;
  // Named only when something went wrong: a fetch that works builds no string.
  auto which = [sequence = wire.tag - 1] { return "rows of pipe message " + std::to_string(sequence); };
  if (pipe == 0) {
    warn(which() + " refused: no pipe from the node that sent them");
    return true;  // dropped
  }
  std::size_t row_bytes = std::size_t(wire.row_floats) * sizeof(float);
  if (wire.bytes > max_pipe_message_bytes || (row_bytes == 0 && wire.bytes != 0) ||
      (row_bytes != 0 && wire.bytes % row_bytes != 0)) {
    warn(which() + " do not match their descriptor (" + std::to_string(wire.bytes) + " bytes of " +
         std::to_string(wire.row_floats) + "-float rows)");
    return true;
  }
  std::size_t num_rows = row_bytes ? wire.bytes / row_bytes : 0;
  auto block = acquire(wire.row_floats, wire.bytes / sizeof(float));
  auto target = caf::actor_cast<caf::actor>(self);
  auto parked = std::make_shared<Message>(std::move(msg));
  void* dest = block->data.data();
  // The receive completes on the pipes' thread, never inside this call: the message comes
  // back to the actor with its rows.
  pipes.receive(pipe, wire.tag - 1, dest, wire.bytes, [target, block, parked, num_rows, which, warn](status got) {
    if (!got.ok() || !fits(*parked, num_rows)) {
      warn(which() + " lost: " + (got.ok() ? std::string("they do not match their descriptor") : got.err().message));
      return;
    }
    parked->rows = block;
    parked->wire = {};
    caf::anon_send(target, std::move(*parked));
  });
  return true;
}

}  // namespace

bool tensor_link::pipe_fetch(caf::event_based_actor* self, routed_tokens& msg) {
  auto sender = self->current_sender();
  return fetch_by_pipe(
      self, msg, *pipes_, sender ? pipes_of(sender->node()).receive : 0,
      [this](std::size_t row_floats, std::size_t floats) { return acquire_block(row_floats, floats); },
      [this](const std::string& what) { warn_once(what); });
}

bool tensor_link::pipe_fetch(caf::event_based_actor* self, expert_outputs& msg) {
  auto sender = self->current_sender();
  return fetch_by_pipe(
      self, msg, *pipes_, sender ? pipes_of(sender->node()).receive : 0,
      [this](std::size_t row_floats, std::size_t floats) { return acquire_block(row_floats, floats); },
      [this](const std::string& what) { warn_once(what); });
}

}  // namespace moert::actors
