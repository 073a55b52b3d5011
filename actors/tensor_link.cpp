#include "actors/tensor_link.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

namespace moert::actors {

// Row blocks that received rows were written into, back from their last lease. Shared with
// the leases' deleters, so it outlives the link. Bounded: at most max_floats are kept.
struct tensor_link::block_pool {
  static constexpr std::size_t max_floats = std::size_t{64} << 20 >> 2;  // 64 MiB
  std::mutex mutex;
  std::vector<std::unique_ptr<row_block>> free;
  std::size_t free_floats = 0;

  // A block of `floats` values; its lease gives `credit` (the channel's pool bytes) back with
  // the block.
  static std::shared_ptr<row_block> acquire(const std::shared_ptr<block_pool>& pool, std::size_t row_floats,
                                            std::size_t floats, std::shared_ptr<void> credit) {
    std::unique_ptr<row_block> block;
    {
      std::lock_guard<std::mutex> guard{pool->mutex};
      // The smallest free block that holds `floats` without growing.
      auto fits = pool->free.end();
      for (auto it = pool->free.begin(); it != pool->free.end(); ++it)
        if ((*it)->data.capacity() >= floats && (fits == pool->free.end() || (*it)->data.capacity() < (*fits)->data.capacity()))
          fits = it;
      if (fits != pool->free.end()) {
        block = std::move(*fits);
        pool->free_floats -= block->data.capacity();
        pool->free.erase(fits);
      }
    }
    if (!block)
      block = std::make_unique<row_block>();
    // Shrinking keeps the bytes; growing within the capacity zero-fills only the new tail.
    block->data.resize(floats);
    block->row_floats = row_floats;
    return std::shared_ptr<row_block>(block.release(), [pool, credit = std::move(credit)](row_block* done) mutable {
      std::unique_ptr<row_block> back{done};
      credit.reset();
      std::lock_guard<std::mutex> guard{pool->mutex};
      if (pool->free_floats + back->data.capacity() <= max_floats) {
        pool->free_floats += back->data.capacity();
        pool->free.push_back(std::move(back));
      }
    });
  }
};

result<std::unique_ptr<tensor_link>> tensor_link::create(transport::ucx_transport transport,
                                                         std::uint32_t process_idx) {
  transport::ucx_channel_config config;
  config.transport = transport;
  auto channel = transport::ucx_channel::create(config);
  if (!channel.ok())
    return channel.err();
  return std::unique_ptr<tensor_link>(new tensor_link(std::move(*channel), process_idx));
}

tensor_link::tensor_link(std::unique_ptr<transport::ucx_channel> channel, std::uint32_t process_idx)
    : channel_(std::move(channel)), blocks_(std::make_shared<block_pool>()), process_idx_(process_idx) {}

// A link over pipes (tensor_link_pipes.cpp): here because the block pool is defined here.
tensor_link::tensor_link(std::unique_ptr<transport::pipe_transport> pipes)
    : blocks_(std::make_shared<block_pool>()), process_idx_(0), pipes_(std::move(pipes)) {}

std::shared_ptr<row_block> tensor_link::acquire_block(std::size_t row_floats, std::size_t floats) {
  return block_pool::acquire(blocks_, row_floats, floats, nullptr);
}

void tensor_link::warn_once(const std::string& what) {
  if (!warned_.exchange(true))
    spdlog::warn("tensor link: {}", what);
}

status tensor_link::add_peer(const caf::node_id& node, const std::string& address) {
  auto peer = channel_->connect(address);
  if (!peer.ok())
    return peer.err();
  std::lock_guard<std::mutex> guard{mutex_};
  peers_[node] = *peer;
  return status::success();
}

void tensor_link::cancel_peer(const caf::node_id& node, std::string reason) {
  if (pipes_) {
    auto pair = pipes_of(node);
    for (auto pipe : {pair.send, pair.receive})
      if (pipe != 0)
        pipes_->cancel(pipe, reason);
    return;
  }
  if (auto peer = peer_of(node))
    channel_->cancel_peer(peer, std::move(reason));
}

bool tensor_link::remote(const caf::actor& dest) const {
  std::lock_guard<std::mutex> guard{mutex_};
  if (pipes_) {
    auto it = pipe_peers_.find(dest.node());
    return it != pipe_peers_.end() && it->second.send != 0;
  }
  return peers_.count(dest.node()) > 0;
}

transport::peer_id tensor_link::peer_of(const caf::node_id& node) const {
  std::lock_guard<std::mutex> guard{mutex_};
  auto it = peers_.find(node);
  return it == peers_.end() ? 0 : it->second;
}

std::uint64_t tensor_link::next_tag() {
  // Top 16 bits: the sending process; never 0, which means "rows in the message".
  return (std::uint64_t(process_idx_ + 1) << 48) | (++sequence_ & ((std::uint64_t{1} << 48) - 1));
}

std::shared_ptr<const std::vector<std::uint8_t>> tensor_link::pack(const row_block& rows,
                                                                   const std::vector<std::uint32_t>& idx,
                                                                   std::vector<std::uint32_t>& renumbered) const {
  return std::make_shared<const std::vector<std::uint8_t>>(wire::pack_rows(rows, idx, renumbered));
}

template <class Message>
void tensor_link::send_bytes(caf::event_based_actor* self, const caf::actor& dest, Message msg,
                             std::shared_ptr<const std::vector<std::uint8_t>> bytes) {
  msg.wire = {next_tag(), bytes->size(), std::uint32_t(msg.rows->row_floats)};
  std::uint64_t tag = msg.wire.tag;
  msg.rows = nullptr;
  bytes_shipped_ += bytes->size();
  ++messages_shipped_;
  // A send that failed earlier (its outcome is not called back: an eager send is done inside
  // the call, and waking the channel thread only to say so would cost every message a hand-off).
  if (auto failures = channel_->send_failures(); failures != send_failures_seen_.exchange(failures))
    warn_once(std::to_string(failures) + " UCX sends failed (a peer died or a deadline passed)");
  // The bytes first: UCX holds them as unexpected until the receiver asks for the tag.
  const void* data = bytes->data();
  std::size_t size = bytes->size();
  channel_->send(peer_of(dest.node()), tag, data, size, std::move(bytes), {});
  self->send(dest, std::move(msg));
}

void tensor_link::ship(caf::event_based_actor* self, const caf::actor& dest, routed_tokens msg) {
  std::vector<std::uint32_t> rows, renumbered;
  for (const auto& route : msg.routes)
    rows.push_back(route.row);
  auto bytes = pack(*msg.rows, rows, renumbered);
  for (std::size_t i = 0; i < msg.routes.size(); ++i)
    msg.routes[i].row = renumbered[i];
  if (pipes_)
    return pipe_send(self, dest, std::move(msg), std::move(bytes));
  send_bytes(self, dest, std::move(msg), std::move(bytes));
}

void tensor_link::ship(caf::event_based_actor* self, const caf::actor& dest, expert_outputs msg) {
  std::vector<std::uint32_t> renumbered;
  auto bytes = pack(*msg.rows, msg.rows_idx, renumbered);
  msg.rows_idx = std::move(renumbered);
  ++e2a_shipped_;
  if (pipes_)
    return pipe_send(self, dest, std::move(msg), std::move(bytes));
  send_bytes(self, dest, std::move(msg), std::move(bytes));
}

template <class Message, class Check>
bool tensor_link::fetch_bytes(caf::event_based_actor* self, Message& msg, Check fits) {
  if (msg.wire.tag == 0)
    return false;
  if (pipes_)
    return pipe_fetch(self, msg);
  auto sender = self->current_sender();
  transport::peer_id peer = sender ? peer_of(sender->node()) : 0;
  wire_descriptor wire = msg.wire;
  std::size_t row_bytes = std::size_t(wire.row_floats) * sizeof(float);
  // Sizes from the peer are checked before anything is allocated: the pool's credit first.
  auto credit = channel_->reserve(wire.bytes);
  if (!credit.ok()) {
    warn_once("rows of tag " + std::to_string(wire.tag) + " refused: " + credit.err().message);
    return true;  // dropped
  }
  if ((row_bytes == 0 && wire.bytes != 0) || (row_bytes != 0 && wire.bytes % row_bytes != 0)) {
    warn_once("rows of tag " + std::to_string(wire.tag) + " do not match their descriptor");
    return true;
  }
  std::size_t num_rows = row_bytes ? wire.bytes / row_bytes : 0;
  auto block = block_pool::acquire(blocks_, wire.row_floats, wire.bytes / sizeof(float), std::move(*credit));
  auto* dest = block->data.data();
  auto target = caf::actor_cast<caf::actor>(self);
  // `msg` is moved into the callback only if the receive stays pending; until then it is
  // parked here, and a receive that completes in the call takes it back.
  auto parked = std::make_shared<Message>(std::move(msg));
  auto arrived = [this, target, wire, fits, num_rows, block, parked](status got) mutable {
    if (!got.ok() || !fits(*parked, num_rows)) {
      warn_once("rows of tag " + std::to_string(wire.tag) + " lost: " +
                (got.ok() ? std::string("they do not match their descriptor") : got.err().message));
      return;
    }
    parked->rows = std::move(block);
    parked->wire = {};
    caf::anon_send(target, std::move(*parked));
  };
  auto now = channel_->receive_into(peer, wire.tag, dest, wire.bytes, block, arrived);
  if (!now.ok()) {
    warn_once("rows of tag " + std::to_string(wire.tag) + " lost: " + now.err().message);
    return true;
  }
  if (!*now)
    return true;  // `arrived` delivers it
  msg = std::move(*parked);
  if (!fits(msg, num_rows)) {
    warn_once("rows of tag " + std::to_string(wire.tag) + " lost: they do not match their descriptor");
    return true;
  }
  msg.rows = std::move(block);
  msg.wire = {};
  return false;  // complete: the caller handles it now
}

bool tensor_link::fetch(caf::event_based_actor* self, routed_tokens& msg) {
  return fetch_bytes(self, msg, [](const routed_tokens& m, std::size_t n) { return wire::routes_fit(m, n); });
}

bool tensor_link::fetch(caf::event_based_actor* self, expert_outputs& msg) {
  return fetch_bytes(self, msg, [](const expert_outputs& m, std::size_t n) { return wire::entries_fit(m, n); });
}

}  // namespace moert::actors
