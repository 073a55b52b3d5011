#pragma once

// The actor a `moert node` process publishes: it hosts, for one engine at a time, the expert
// devices (a μ-queue and an expert actor each) and the attention shards the cluster file
// places on this node. The engine asks with host_experts / host_shards and wires the handles
// it gets back; the node loads the model itself from the checkpoint path (every node can
// read it) or builds the same synthetic model from its config text and seed.
//
// The node watches the engine that asked: when it goes (shutdown, crash, lost connection)
// the hosted actors are stopped and the devices torn down, and the node serves the next one.
//
// Recovery (the engine's cluster_supervisor, actors/node_supervisor.hpp): (adopt_atom,
// host_experts) asks a node already serving the engine to host one more expert device that a
// lost node held, (adopt_atom, host_shards) one more attention shard. The node loads that
// part's weights from the checkpoint into a context of its own (its other devices keep
// theirs) and answers with the new μ-queues or shards, as host_atom does.
//
// With a ucx transport the engine first sets up each node's tensor link: (link_atom,
// transport, process index) → this node's UCX worker address, then (link_atom, peer node id,
// peer address) for every other node. With nccl: (link_atom, "nccl", process index) makes the
// link (pipes over an nccl_channel on CUDA device (process index mod GPUs); "" back), then per direction
// between an attention and an expert node (link_atom, pipe_atom, receiver's node id) → the
// 128-byte NCCL id of a new sending pipe, made here, which the engine hands to the receiver
// as (link_atom, pipe_atom, sender's node id, id).
//
// Direct connections: the engine asks each attention node to connect to each expert node
// (peer_atom, host, port, name), through the same authenticated gate (or TLS) the engine's
// own connection uses, so that A2E and E2A messages go node to node. Without them CAF 0.17
// routes a node-to-node message through the engine's process (it learnt the handles there):
// two gates and one more process per hop. CAF sends to an actor by its node's direct route
// once one exists, whichever connection brought the handle.
//
// Runs detached (its own thread): loading a checkpoint or connecting blocks only this actor.

#include "actors/device.hpp"
#include "actors/protocol.hpp"
#include "actors/runtime.hpp"
#include "actors/tensor_link.hpp"
#include "transport/fault_injector.hpp"

#include <caf/all.hpp>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace moert::actors {

using host_atom = caf::atom_constant<caf::atom("host")>;
using release_atom = caf::atom_constant<caf::atom("release")>;
using peer_atom = caf::atom_constant<caf::atom("peer")>;
using pipe_atom = caf::atom_constant<caf::atom("pipe")>;

// A connection to another node's listener: its node_host, and what keeps the connection up
// (an outbound gate) while it is held.
struct peer_connection {
  caf::actor node;
  std::shared_ptr<void> keep;
};
// Connects to a node listening at host:port, authenticated as the engine's own connections
// are (the shared secret through a gate, TLS, or plain loopback). Blocking, bounded by the
// deadline; errors name the address. Supplied by the process (it owns CAF's network modules).
using peer_connector = std::function<result<peer_connection>(const std::string& host, std::uint16_t port,
                                                             std::chrono::steady_clock::time_point deadline)>;
using adopt_atom = caf::atom_constant<caf::atom("adopt")>;

// Where a node finds the model: a checkpoint directory, or a synthetic model's config.json
// text and weight seed (what EngineConfig::synthetic_config builds in one process).
// `attention_side` and the expert devices say which part of a checkpoint this node loads
// (a synthetic model is built whole).
struct model_source {
  std::string model_dir;
  std::string synthetic_config;
  std::uint64_t weight_seed = 1;
  bool attention_side = true;
  std::uint32_t first_expert_device = 0, num_expert_devices = 0;
  // The backend the node builds this part's devices on: "cpu", "cuda", or "" for the node's
  // own (`moert node --backend`, cpu by default). The cluster file's per-node "backend".
  std::string backend;
};

}  // namespace moert::actors

// The fault plan travels to every node at bring-up (host_experts / host_shards) over the
// authenticated CAF connection, and each node's counts come back the same way.
namespace moert::transport {

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, fault_kill& x) {
  return f(caf::meta::type_name("fault_kill"), x.actor, x.device, x.after_messages);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, fault_slow& x) {
  return f(caf::meta::type_name("fault_slow"), x.device, x.factor);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, fault_node& x) {
  return f(caf::meta::type_name("fault_node"), x.node, x.signal, x.after_messages, x.for_ms);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, fault_plan& x) {
  return f(caf::meta::type_name("fault_plan"), x.seed, x.drop, x.duplicate, x.reorder, x.delay_probability,
           x.delay_max_ms, x.kill, x.slow, x.nodes, x.retransmit_ms, x.retransmit_max_ms, x.max_retransmits);
}
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, fault_counts& x) {
  return f(caf::meta::type_name("fault_counts"), x.messages, x.dropped, x.duplicated, x.reordered, x.delayed,
           x.killed, x.slowed_tasks, x.retransmitted, x.ignored_e2a, x.failed_batches, x.node_faults);
}

}  // namespace moert::transport

namespace moert::actors {

using fault_atom = caf::atom_constant<caf::atom("faults")>;  // engine → node: (get, faults) → its fault_counts

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, model_source& x) {
  return f(caf::meta::type_name("model_source"), x.model_dir, x.synthetic_config, x.weight_seed, x.attention_side,
           x.first_expert_device, x.num_expert_devices, x.backend);
}

// Expert devices [first_device, first_device + num_devices) of `total_expert_devices`.
// Reply: their μ-queues, in device order.
struct host_experts {
  model_source model;
  std::uint32_t first_device = 0;
  std::uint32_t num_devices = 0;
  std::uint32_t total_expert_devices = 0;
  std::uint32_t threads_per_device = 1;
  scheduler_update scheduler;
  caf::actor owner;  // the engine's ingress: the node tears down when it goes
  bool with_faults = false;  // the engine's fault plan, when it has one
  transport::fault_plan faults{};
};

// Attention shards [first_shard, first_shard + num_shards). Reply: the shards, in order.
struct host_shards {
  model_source model;
  std::uint32_t first_shard = 0;
  std::uint32_t num_shards = 0;
  std::uint32_t total_expert_devices = 0;
  std::uint32_t threads_per_device = 1;
  plan_update plan;
  std::vector<caf::actor> queues;  // every expert device's μ-queue, in global order
  caf::actor owner;                // the engine's ingress (hears each request's end)
  bool with_faults = false;
  transport::fault_plan faults{};
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, host_experts& x) {
  return f(caf::meta::type_name("host_experts"), x.model, x.first_device, x.num_devices, x.total_expert_devices,
           x.threads_per_device, x.scheduler, x.owner, x.with_faults, x.faults);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, host_shards& x) {
  return f(caf::meta::type_name("host_shards"), x.model, x.first_shard, x.num_shards, x.total_expert_devices,
           x.threads_per_device, x.plan, x.queues, x.owner, x.with_faults, x.faults);
}

void register_node_message_types(caf::actor_system_config& config);

class node_host : public caf::event_based_actor {
public:
  // `name` labels the node's devices ("e0: expert 1").
  // Without `connector` the node refuses peer_atom (no direct connections).
  // `backend`: what its devices run when the engine's model_source names none. Off the cpu
  // backend each device loads its own part of the weights onto its backend (as the engine's
  // devices do in one process); a backend that cannot run here makes every host request fail
  // with the reason, which the engine's bring-up reports naming this node.
  // `expert_gemm`: the grouped/dense switch its cuda devices start with (`moert node
  // --gemm-testbed`: the calibration of this machine's GPU).
  node_host(caf::actor_config& cfg, std::string name, peer_connector connector = {},
            gpu::backend_kind backend = gpu::backend_kind::cpu, gpu::gemm_calibration expert_gemm = {});
  ~node_host() override;

  caf::behavior make_behavior() override;
  void on_exit() override;

private:
  // Loads the model once per engine; returns the error (naming the source) or "".
  std::string ensure_model(const model_source& source, std::uint32_t total_expert_devices, const caf::actor& owner,
                           const transport::fault_plan* faults);
  // The part of the model `source` names, in a context of its own; an error text or "".
  std::string load_context(const model_source& source, std::uint32_t total_expert_devices,
                           std::unique_ptr<runtime_context>& out);
  // The backend `source` asks for (its own or the node's), or an error text.
  result<gpu::backend_kind> backend_for(const model_source& source) const;
  // A device for `part` of the model: cpu devices read the context's shared host weights,
  // others hold their own part on their backend (actors::make_device_with_weights), read from
  // `checkpoint`, which the first such device opens and the caller's next devices reuse.
  result<std::unique_ptr<device>> make_device(const runtime_context* ctx, const model_source& source,
                                              const std::string& name, const model::load_options& part,
                                              std::uint32_t threads, std::optional<model::checkpoint>& checkpoint);
  // Every device is made before any actor is spawned: a device that cannot be made fails the
  // request with nothing left running.
  result<std::vector<caf::actor>> spawn_experts(runtime_context* ctx, const host_experts& ask);  // sets ctx's expert_devices
  result<std::vector<caf::actor>> spawn_shards(const runtime_context* ctx, const host_shards& ask);
  // An adoption is only for the engine this node already serves.
  std::string check_adopter(const caf::actor& owner) const;
  void teardown();

  std::string name_;
  gpu::backend_kind default_backend_;
  gpu::gemm_calibration expert_gemm_;
  std::unique_ptr<runtime_stats> stats_;
  std::unique_ptr<transport::fault_injector> faults_;  // the engine's plan, this node's share
  std::map<caf::actor_addr, caf::actor> expert_queue_;  // each hosted expert's μ-queue
  std::unique_ptr<runtime_context> ctx_;
  // Parts adopted from lost nodes, each with its own weights (after devices_ in teardown).
  std::vector<std::unique_ptr<runtime_context>> adopted_ctx_;
  std::string loaded_key_;  // what ctx_ was built from
  caf::actor owner_;
  std::vector<std::unique_ptr<device>> devices_;
  std::vector<caf::actor> hosted_;
  std::unique_ptr<tensor_link> link_;  // ucx and nccl transports: this node's data path
  peer_connector connector_;
  // Direct connections to other nodes, by "host:port": kept while the engine lives.
  std::map<std::string, peer_connection> peers_;
};

}  // namespace moert::actors
