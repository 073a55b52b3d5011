#pragma once

// Bring-up of an engine's cluster (internal to engine/): connects to every node through an
// authenticating gate, asks the expert nodes for their μ-queues and the attention nodes for
// their shards, and keeps what must live as long as the engine (the gates).

#include "actors/node_host.hpp"
#include "engine/cluster_config.hpp"
#include "transport/auth_gate.hpp"

#include <caf/all.hpp>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace moert {

struct cluster_session {
  std::vector<std::unique_ptr<transport::outbound_gate>> gates;
  std::vector<caf::actor> nodes;   // node_host per cluster node, in file order
  std::vector<caf::actor> queues;  // μ-queue per global expert device
  std::vector<caf::actor> shards;  // per global attention shard
  // Over TLS (no gates): this process's TLS byte count (tls_wrap.hpp) before bring-up.
  bool tls = false;
  std::uint64_t tls_bytes_before = 0;
  // What this process's CAF connections to the nodes carried since bring-up began, both ways:
  // the gates' counts, or over TLS every TLS byte of this process (so another TLS user in the
  // same process would be counted too).
  std::uint64_t caf_bytes() const;
};

struct cluster_request {
  actors::model_source model;
  std::uint32_t threads_per_device = 1;
  actors::scheduler_update scheduler;
  actors::plan_update plan;
  caf::actor ingress;
  std::chrono::milliseconds timeout{60000};
  const transport::fault_plan* faults = nullptr;  // every node gets the engine's plan (null: none)
};

// Sets CAF's heartbeat and connection timeout (off by default in 0.17) and registers the
// message types: call on the config before the actor system exists, in the engine and in
// every node alike.
void configure_for_cluster(caf::actor_system_config& config, std::chrono::milliseconds heartbeat,
                           std::chrono::milliseconds liveness_timeout, const cluster_tls& tls = {});

// One authenticated CAF connection to the node listening at host:port: through an outbound
// gate with the secret, over TLS, or plainly (loopback only, without a secret). Retries what a
// node still starting answers (refused, a first-heartbeat timeout) while a try fits before
// `deadline`. Blocking. Errors say what failed, not which node (callers add the name).
struct node_link {
  caf::actor node;
  std::unique_ptr<transport::outbound_gate> gate;  // relays the connection: keep it while used
};
result<node_link> connect_node(caf::actor_system& system, const std::string& host, std::uint16_t port,
                               const std::string& secret, bool tls, std::chrono::milliseconds liveness_timeout,
                               std::chrono::steady_clock::time_point deadline);

// A node_host's peer_connector: connect_node with this node's secret or TLS.
actors::peer_connector make_peer_connector(caf::actor_system& system, std::string secret, bool tls,
                                           std::chrono::milliseconds liveness_timeout);

// Every wait is bounded by `ask.timeout`; errors name the node. Each attention node is also
// connected directly to each expert node (node_host's peer_atom, with the secret or TLS), so
// that A2E and E2A do not pass through this process.
result<cluster_session> connect_cluster(caf::actor_system& system, const cluster_config& cluster,
                                        const std::string& secret, const cluster_request& ask,
                                        bool tls = false);

}  // namespace moert
