#include "actors/tensor_link.hpp"

#include <spdlog/spdlog.h>

namespace moert::actors {

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
    : channel_(std::move(channel)), process_idx_(process_idx) {}

status tensor_link::add_peer(const caf::node_id& node, const std::string& address) {
  auto peer = channel_->connect(address);
  if (!peer.ok())
    return peer.err();
  std::lock_guard<std::mutex> guard{mutex_};
  peers_[node] = *peer;
  return status::success();
}

void tensor_link::cancel_peer(const caf::node_id& node, std::string reason) {
  if (auto peer = peer_of(node))
    channel_->cancel_peer(peer, std::move(reason));
}

bool tensor_link::remote(const caf::actor& dest) const {
  std::lock_guard<std::mutex> guard{mutex_};
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
  // The bytes first: UCX holds them as unexpected until the receiver asks for the tag.
  channel_->send(peer_of(dest.node()), tag, std::move(bytes), [this](status sent) {
    if (!sent.ok() && !warned_.exchange(true))
      spdlog::warn("tensor link: {}", sent.err().message);
  });
  self->send(dest, std::move(msg));
}

void tensor_link::ship(caf::event_based_actor* self, const caf::actor& dest, routed_tokens msg) {
  std::vector<std::uint32_t> rows, renumbered;
  for (const auto& route : msg.routes)
    rows.push_back(route.row);
  auto bytes = pack(*msg.rows, rows, renumbered);
  for (std::size_t i = 0; i < msg.routes.size(); ++i)
    msg.routes[i].row = renumbered[i];
  send_bytes(self, dest, std::move(msg), std::move(bytes));
}

void tensor_link::ship(caf::event_based_actor* self, const caf::actor& dest, expert_outputs msg) {
  std::vector<std::uint32_t> renumbered;
  auto bytes = pack(*msg.rows, msg.rows_idx, renumbered);
  msg.rows_idx = std::move(renumbered);
  send_bytes(self, dest, std::move(msg), std::move(bytes));
}

template <class Message, class Check>
bool tensor_link::fetch_bytes(caf::event_based_actor* self, Message& msg, Check fits) {
  if (msg.wire.tag == 0)
    return false;
  auto sender = self->current_sender();
  transport::peer_id peer = sender ? peer_of(sender->node()) : 0;
  wire_descriptor wire = msg.wire;
  auto target = caf::actor_cast<caf::actor>(self);
  channel_->receive(peer, wire.tag, wire.bytes,
                    [this, target, wire, fits, msg = std::move(msg)](result<transport::received_buffer> got) mutable {
                      std::size_t num_rows = 0;
                      std::shared_ptr<row_block> block;
                      if (got.ok())
                        block = wire::unpack_rows(wire.row_floats, got->bytes(), num_rows);
                      if (!block || !fits(msg, num_rows)) {
                        if (!warned_.exchange(true))
                          spdlog::warn("tensor link: rows of tag {:#x} lost: {}", wire.tag,
                                       got.ok() ? "they do not match their descriptor" : got.err().message);
                        return;
                      }
                      msg.rows = std::move(block);
                      msg.wire = {};
                      caf::anon_send(target, std::move(msg));
                    });
  return true;
}

bool tensor_link::fetch(caf::event_based_actor* self, routed_tokens& msg) {
  return fetch_bytes(self, msg, [](const routed_tokens& m, std::size_t n) { return wire::routes_fit(m, n); });
}

bool tensor_link::fetch(caf::event_based_actor* self, expert_outputs& msg) {
  return fetch_bytes(self, msg, [](const expert_outputs& m, std::size_t n) { return wire::entries_fit(m, n); });
}

}  // namespace moert::actors
