#include "engine/cluster.hpp"

#include <caf/io/all.hpp>
#include <caf/openssl/all.hpp>

#include <algorithm>
#include <thread>

namespace moert {

void configure_for_cluster(caf::actor_system_config& config, std::chrono::milliseconds heartbeat,
                           std::chrono::milliseconds liveness_timeout, const cluster_tls& tls) {
  actors::register_node_message_types(config);
  config.load<caf::io::middleman>();
  if (tls.enabled()) {
    // CAF's OpenSSL module verifies the peer against the CA both ways (a peer whose
    // certificate another CA signed is refused during the TLS handshake).
    config.load<caf::openssl::manager>();
    config.openssl_certificate = tls.cert_file;
    config.openssl_key = tls.key_file;
    config.openssl_cafile = tls.ca_file;
  }
  config.set("middleman.heartbeat-interval", caf::timespan{heartbeat});
  config.set("middleman.connection-timeout", caf::timespan{liveness_timeout});
}

namespace {

error node_error(const cluster_node& node, const std::string& what) {
  return make_error(error_code::io_error, "node " + node.name + " (" + node.host + ":" + std::to_string(node.port) +
                                             "): " + what);
}

template <class Reply>
result<Reply> ask_for(caf::actor_system& system, const caf::actor& node_actor, const cluster_node& node,
                  const caf::message& what, std::chrono::milliseconds timeout) {
  caf::scoped_actor self{system};
  std::optional<Reply> reply;
  std::string failure;
  self->request(node_actor, timeout, what)
      .receive([&](Reply& answer) { reply = std::move(answer); },
               [&](caf::error& err) { failure = system.render(err); });
  if (!reply)
    return node_error(node, failure.empty() ? "no answer" : failure);
  return std::move(*reply);
}

result<std::vector<caf::actor>> ask_node(caf::actor_system& system, const caf::actor& node_actor,
                                         const cluster_node& node, const caf::message& what,
                                         std::chrono::milliseconds timeout) {
  return ask_for<std::vector<caf::actor>>(system, node_actor, node, what, timeout);
}

}  // namespace

result<cluster_session> connect_cluster(caf::actor_system& system, const cluster_config& cluster,
                                        const std::string& secret, const cluster_request& ask, bool tls) {
  cluster_session session;
  // One deadline for connecting to every node.
  auto deadline = std::chrono::steady_clock::now() + ask.timeout;
  for (const auto& node : cluster.nodes) {
    std::string host = node.host;
    std::uint16_t port = node.port;
    // CAF 0.17 can time a fresh connection out at its first heartbeat tick when the peer's
    // BASP handshake has not arrived yet (the gate still authenticating, a TLS handshake, a
    // loaded node), and a node started together with the caller may not listen yet (refused):
    // those errors are retried while one more try (up to the liveness timeout) fits the
    // deadline; any other is final.
    auto retryable = [](const caf::error& error) {
      return error == caf::sec::connection_timeout || error == caf::sec::cannot_connect_to_node;
    };
    auto connect = [&](auto attempt) {
      auto remote = attempt();
      while (!remote && retryable(remote.error()) &&
             std::chrono::steady_clock::now() + cluster.liveness_timeout < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds{100});
        remote = attempt();
      }
      return remote;
    };
    if (tls) {
      auto remote = connect([&] { return caf::openssl::remote_actor(system, host, port); });
      if (!remote)
        return node_error(node, "cannot connect over TLS: " + system.render(remote.error()) +
                                    " (a certificate the CA did not sign, or the node is not running)");
      session.nodes.push_back(*remote);
      continue;
    }
    if (!secret.empty()) {
      transport::gate_limits limits;
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      limits.handshake_timeout = std::clamp(left, std::chrono::milliseconds{1}, std::chrono::milliseconds{5000});
      auto gate = transport::outbound_gate::start(node.host, node.port, secret, limits);
      if (!gate.ok())
        return node_error(node, gate.err().message);
      host = "127.0.0.1";
      port = (*gate)->local_port();
      session.gates.push_back(std::move(*gate));
    } else if (!transport::is_loopback(node.host)) {
      return node_error(node, "a node beyond loopback needs the cluster secret (--secret-file)");
    }
    auto remote = connect([&] { return system.middleman().remote_actor(host, port); });
    if (!remote)
      return node_error(node, "cannot connect: " + system.render(remote.error()) +
                                  (secret.empty() ? "" : " (wrong secret, or the node is not running)"));
    session.nodes.push_back(*remote);
  }

  if (cluster.transport != cluster_transport::caf) {
    // Every node's UCX worker address, then every node learns every other.
    std::vector<std::string> addresses;
    for (std::size_t i = 0; i < cluster.nodes.size(); ++i) {
      auto address = ask_for<std::string>(system, session.nodes[i], cluster.nodes[i],
                                      caf::make_message(actors::link_atom::value, std::string{to_string(cluster.transport)},
                                                        std::uint32_t(i)),
                                      ask.timeout);
      if (!address.ok())
        return address.err();
      addresses.push_back(std::move(*address));
    }
    for (std::size_t i = 0; i < cluster.nodes.size(); ++i)
      for (std::size_t j = 0; j < cluster.nodes.size(); ++j) {
        if (i == j)
          continue;
        auto linked = ask_for<caf::atom_value>(system, session.nodes[i], cluster.nodes[i],
                                           caf::make_message(actors::link_atom::value, session.nodes[j].node(),
                                                             addresses[j]),
                                           ask.timeout);
        if (!linked.ok())
          return linked.err();
      }
  }

  auto total_experts = std::uint32_t(cluster.expert_devices());
  // What each node loads: its expert devices' experts, and the attention side if it hosts shards.
  std::vector<actors::model_source> parts;
  for (std::size_t i = 0, device = 0; i < cluster.nodes.size(); device += cluster.nodes[i].expert_devices, ++i) {
    actors::model_source part = ask.model;
    part.attention_side = cluster.nodes[i].attention_devices > 0;
    part.first_expert_device = std::uint32_t(device);
    part.num_expert_devices = std::uint32_t(cluster.nodes[i].expert_devices);
    parts.push_back(std::move(part));
  }
  std::uint32_t next_device = 0;
  for (std::size_t i = 0; i < cluster.nodes.size(); ++i) {
    const auto& node = cluster.nodes[i];
    if (node.expert_devices == 0)
      continue;
    actors::host_experts host{parts[i],          next_device,  std::uint32_t(node.expert_devices), total_experts,
                              ask.threads_per_device, ask.scheduler, ask.ingress};
    if (ask.faults) {
      host.with_faults = true;
      host.faults = *ask.faults;
    }
    auto queues = ask_node(system, session.nodes[i], node, caf::make_message(actors::host_atom::value, host),
                           ask.timeout);
    if (!queues.ok())
      return queues.err();
    if (queues->size() != node.expert_devices)
      return node_error(node, "answered with the wrong number of expert queues");
    session.queues.insert(session.queues.end(), queues->begin(), queues->end());
    next_device += std::uint32_t(node.expert_devices);
  }

  std::uint32_t next_shard = 0;
  for (std::size_t i = 0; i < cluster.nodes.size(); ++i) {
    const auto& node = cluster.nodes[i];
    if (node.attention_devices == 0)
      continue;
    actors::host_shards host{parts[i],   next_shard,     std::uint32_t(node.attention_devices), total_experts,
                             ask.threads_per_device, ask.plan, session.queues, ask.ingress};
    if (ask.faults) {
      host.with_faults = true;
      host.faults = *ask.faults;
    }
    auto shards = ask_node(system, session.nodes[i], node, caf::make_message(actors::host_atom::value, host),
                           ask.timeout);
    if (!shards.ok())
      return shards.err();
    if (shards->size() != node.attention_devices)
      return node_error(node, "answered with the wrong number of shards");
    session.shards.insert(session.shards.end(), shards->begin(), shards->end());
    next_shard += std::uint32_t(node.attention_devices);
  }
  return session;
}

}  // namespace moert
