#pragma once

// The UCX side of a cluster's data path: A2E and E2A rows between processes travel by UCX tag
// messages while the CAF message carries a wire_descriptor {tag, bytes, row floats}. One link
// per process (a node's shards and experts share it); its peers are the other processes of
// the cluster, learnt at bring-up by CAF node id with their worker addresses.
//
// ship(): packs the rows the destination needs, sends them by UCX (from the caller's thread: an
// eager send is done inside the call), then the descriptor by CAF.
// fetch(): for a message that arrived with a descriptor, receives the bytes (bounded pool,
// deadline) straight into the row block the message will carry, a block reused from this
// link's pool (no allocation, page faults or zero fill once warm). Bytes that are here already
// (the usual case: they left before the descriptor, which takes two CAF hops) complete inside
// the call, and fetch returns false: the actor handles the message at once. Otherwise the
// completed message is delivered to the actor again later, and fetch returns true. A fetch that
// fails (the peer died, a deadline passed, the bytes do not match the descriptor) drops the
// message and logs once: the node watch ends the requests.
//
// Thread safety: ship() and fetch() may be called from any actor at once.
//
// The GPU row path (cluster transport "nccl"; tensor_link_pipes.cpp): a link made by
// create_with_pipes moves the bytes through one-way pipes (transport/pipe_transport.hpp: NCCL
// between the nodes' GPUs, or an in-process stand-in in tests) instead of UCX: one pipe per
// direction per peer node, opened at bring-up with a key the sending side makes
// (open_send_to) and the receiving side gets through the engine's CAF control path
// (open_receive_from). The descriptor carries the pipe's sequence number + 1 as its tag; the
// receiver finds the pipe by the sending node and receives that sequence number straight into
// a pooled row block, always completing later (fetch returns true). Rows stay host memory at
// the actor boundary, as on UCX; the NCCL pipes stage them through device memory. A pipe that
// failed (its peer lost, a deadline passed) makes ship() put the rows in the CAF message
// instead, so a broken pipe costs speed, not the request.

#include "actors/protocol.hpp"
#include "transport/pipe_transport.hpp"
#include "transport/ucx_channel.hpp"

#include <caf/all.hpp>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>

namespace moert::actors {

using link_atom = caf::atom_constant<caf::atom("link")>;

class tensor_link {
public:
  // `process_idx` makes this process's tags unique in the cluster.
  static result<std::unique_ptr<tensor_link>> create(transport::ucx_transport transport, std::uint32_t process_idx);
  // The GPU row path over `pipes` (make_nccl_pipes, or a stand-in in tests). Not null.
  static std::unique_ptr<tensor_link> create_with_pipes(std::unique_ptr<transport::pipe_transport> pipes);
  // Where the nodes have NCCL: pipes over an nccl_channel on CUDA device `device`; an error
  // naming why not (no CUDA device, or a build without NCCL).
  static result<std::unique_ptr<tensor_link>> create_nccl(int device);

  // Pipe bring-up (links made with pipes only): a new pipe from this process to `node`, whose
  // key the caller hands to that node's open_receive_from; and the receiving end of a pipe
  // from `node`.
  result<transport::pipe_key> open_send_to(const caf::node_id& node);
  status open_receive_from(const caf::node_id& node, const transport::pipe_key& key);
  bool uses_pipes() const { return pipes_ != nullptr; }
  // Messages whose rows went in the CAF message because their pipe had failed.
  std::uint64_t pipe_fallbacks() const { return pipe_fallbacks_; }

  // The UCX worker address ("" for a link with pipes).
  const std::string& address() const { return channel_ ? channel_->address() : no_address_; }
  status add_peer(const caf::node_id& node, const std::string& address);

  // Fails at once every pending transfer with that process (its node was found dead).
  void cancel_peer(const caf::node_id& node, std::string reason);

  // Whether `dest` lives in another process this link reaches.
  bool remote(const caf::actor& dest) const;

  void ship(caf::event_based_actor* self, const caf::actor& dest, routed_tokens msg);
  void ship(caf::event_based_actor* self, const caf::actor& dest, expert_outputs msg);
  bool fetch(caf::event_based_actor* self, routed_tokens& msg);
  bool fetch(caf::event_based_actor* self, expert_outputs& msg);

  // Rows this process sent by UCX since it started.
  std::uint64_t bytes_shipped() const { return bytes_shipped_; }
  std::uint64_t messages_shipped() const { return messages_shipped_; }
  // Of those, E2A messages (the rest are A2E).
  std::uint64_t e2a_shipped() const { return e2a_shipped_; }

private:
  tensor_link(std::unique_ptr<transport::ucx_channel> channel, std::uint32_t process_idx);
  explicit tensor_link(std::unique_ptr<transport::pipe_transport> pipes);
  std::uint64_t next_tag();
  transport::peer_id peer_of(const caf::node_id& node) const;
  std::shared_ptr<const std::vector<std::uint8_t>> pack(const row_block& rows, const std::vector<std::uint32_t>& idx,
                                                        std::vector<std::uint32_t>& renumbered) const;
  void warn_once(const std::string& what);
  template <class Message>
  void send_bytes(caf::event_based_actor* self, const caf::actor& dest, Message msg,
                  std::shared_ptr<const std::vector<std::uint8_t>> bytes);
  template <class Message, class Check>
  bool fetch_bytes(caf::event_based_actor* self, Message& msg, Check fits);
  // A pooled row block of `floats` values (its lease returns it to the pool).
  std::shared_ptr<row_block> acquire_block(std::size_t row_floats, std::size_t floats);
  // The pipe half (tensor_link_pipes.cpp).
  void pipe_send(caf::event_based_actor* self, const caf::actor& dest, routed_tokens msg,
                 std::shared_ptr<const std::vector<std::uint8_t>> bytes);
  void pipe_send(caf::event_based_actor* self, const caf::actor& dest, expert_outputs msg,
                 std::shared_ptr<const std::vector<std::uint8_t>> bytes);
  bool pipe_fetch(caf::event_based_actor* self, routed_tokens& msg);
  bool pipe_fetch(caf::event_based_actor* self, expert_outputs& msg);
  struct pipe_pair {
    transport::pipe_id send = 0, receive = 0;
  };
  pipe_pair pipes_of(const caf::node_id& node) const;

  struct block_pool;  // row blocks for received rows, reused once their leases are gone
  std::unique_ptr<transport::ucx_channel> channel_;
  std::shared_ptr<block_pool> blocks_;
  std::uint32_t process_idx_;
  std::atomic<std::uint64_t> sequence_{0};
  mutable std::mutex mutex_;  // guards peers_
  std::map<caf::node_id, transport::peer_id> peers_;
  std::atomic<bool> warned_{false};
  std::atomic<std::uint64_t> send_failures_seen_{0};
  std::atomic<std::uint64_t> bytes_shipped_{0};
  std::atomic<std::uint64_t> messages_shipped_{0};
  std::atomic<std::uint64_t> e2a_shipped_{0};
  std::atomic<std::uint64_t> pipe_fallbacks_{0};
  std::string no_address_;
  std::map<caf::node_id, pipe_pair> pipe_peers_;  // guarded by mutex_
  // Last: destroyed first, so the callbacks it runs on closing still find the members above.
  std::unique_ptr<transport::pipe_transport> pipes_;
};

}  // namespace moert::actors
