#include "engine/cluster.hpp"

#include "engine/tls_wrap.hpp"

#include <caf/io/all.hpp>
#include <caf/openssl/all.hpp>
#include <spdlog/spdlog.h>

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
    if (!tls_error_queue_guarded())
      spdlog::warn("TLS: libcaf_openssl's calls do not reach moert's error-queue fix (engine/tls_wrap.hpp): "
                   "one failed TLS connection can close this process's others");
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

namespace {

// caf::openssl::remote_actor and middleman::remote_actor ask the middleman actor with no
// timeout (a function_view): this is the same request, bounded by `deadline`.
caf::expected<caf::actor> remote_node(caf::actor_system& system, const caf::io::middleman_actor& middleman,
                                      const std::string& host, std::uint16_t port,
                                      std::chrono::steady_clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
  caf::scoped_actor self{system};
  caf::expected<caf::actor> out{caf::sec::request_timeout};
  self->request(middleman, std::max(left, std::chrono::milliseconds{1}), caf::connect_atom::value, host, port)
      .receive(
          [&](caf::node_id&, caf::strong_actor_ptr& found, std::set<std::string>&) {
            if (found)
              out = caf::actor_cast<caf::actor>(std::move(found));
            else
              out = caf::make_error(caf::sec::no_actor_published_at_port, port);
          },
          [&](caf::error& error) { out = std::move(error); });
  return out;
}

}  // namespace

result<node_link> connect_node(caf::actor_system& system, const std::string& host, std::uint16_t port,
                               const std::string& secret, bool tls, std::chrono::milliseconds liveness_timeout,
                               std::chrono::steady_clock::time_point deadline) {
  // CAF 0.17 can time a fresh connection out at its first heartbeat tick when the peer's
  // BASP handshake has not arrived yet (the gate still authenticating, a TLS handshake, a
  // loaded node), and a node started together with the caller may not listen yet (refused):
  // those errors are retried while one more try (up to the liveness timeout) fits the
  // deadline; any other is final.
  auto retryable = [](const caf::error& error) {
    return error == caf::sec::connection_timeout || error == caf::sec::cannot_connect_to_node;
  };
  auto connect = [&](const caf::io::middleman_actor& middleman, const std::string& to_host, std::uint16_t to_port) {
    auto remote = remote_node(system, middleman, to_host, to_port, deadline);
    while (!remote && retryable(remote.error()) && std::chrono::steady_clock::now() + liveness_timeout < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds{100});
      remote = remote_node(system, middleman, to_host, to_port, deadline);
    }
    return remote;
  };
  node_link link;
  if (tls) {
    auto remote = connect(system.openssl_manager().actor_handle(), host, port);
    if (!remote)
      return make_error(error_code::io_error, "cannot connect over TLS: " + system.render(remote.error()) +
                                                  " (a certificate the CA did not sign, or the node is not running)");
    link.node = *remote;
    return link;
  }
  std::string caf_host = host;
  std::uint16_t caf_port = port;
  if (!secret.empty()) {
    transport::gate_limits limits;
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    limits.handshake_timeout = std::clamp(left, std::chrono::milliseconds{1}, std::chrono::milliseconds{5000});
    auto gate = transport::outbound_gate::start(host, port, secret, limits);
    if (!gate.ok())
      return gate.err();
    caf_host = "127.0.0.1";
    caf_port = (*gate)->local_port();
    link.gate = std::move(*gate);
  } else if (!transport::is_loopback(host)) {
    return make_error(error_code::invalid_argument, "a node beyond loopback needs the cluster secret (--secret-file)");
  }
  auto remote = connect(system.middleman().actor_handle(), caf_host, caf_port);
  if (!remote)
    return make_error(error_code::io_error, "cannot connect: " + system.render(remote.error()) +
                                                (secret.empty() ? "" : " (wrong secret, or the node is not running)"));
  link.node = *remote;
  return link;
}

actors::peer_connector make_peer_connector(caf::actor_system& system, std::string secret, bool tls,
                                           std::chrono::milliseconds liveness_timeout) {
  return [&system, secret = std::move(secret), tls, liveness_timeout](
             const std::string& host, std::uint16_t port,
             std::chrono::steady_clock::time_point deadline) -> result<actors::peer_connection> {
    auto link = connect_node(system, host, port, secret, tls, liveness_timeout, deadline);
    if (!link.ok())
      return link.err();
    return actors::peer_connection{link->node, std::shared_ptr<transport::outbound_gate>(std::move(link->gate))};
  };
}

std::uint64_t cluster_session::caf_bytes() const {
  std::uint64_t bytes = tls ? tls_bytes_moved() - tls_bytes_before : 0;
  for (const auto& gate : gates)
    bytes += gate->counters().bytes_from_network + gate->counters().bytes_to_network;
  return bytes;
}

result<cluster_session> connect_cluster(caf::actor_system& system, const cluster_config& cluster,
                                        const std::string& secret, const cluster_request& ask, bool tls) {
  cluster_session session;
  session.tls = tls;
  session.tls_bytes_before = tls_bytes_moved();
  // One deadline for connecting to every node.
  auto deadline = std::chrono::steady_clock::now() + ask.timeout;
  for (const auto& node : cluster.nodes) {
    auto link = connect_node(system, node.host, node.port, secret, tls, cluster.liveness_timeout, deadline);
    if (!link.ok())
      return node_error(node, link.err().message);
    session.nodes.push_back(link->node);
    if (link->gate)
      session.gates.push_back(std::move(link->gate));
  }

  if (cluster.transport == cluster_transport::nccl) {
    // Every node makes its link (an nccl_channel on its GPU: a node without one fails here,
    // naming itself and why).
    for (std::size_t i = 0; i < cluster.nodes.size(); ++i) {
      auto made = ask_for<std::string>(system, session.nodes[i], cluster.nodes[i],
                                       caf::make_message(actors::link_atom::value, std::string{"nccl"},
                                                         std::uint32_t(i)),
                                       ask.timeout);
      if (!made.ok())
        return made.err();
    }
    // One pipe per direction per (attention node, expert node): rows only flow between those.
    // A pipe is a two-rank communicator that only sends one way (transport/nccl_channel.hpp
    // says why one per direction: a shared one can deadlock). Its id is made by the sender and
    // reaches the receiver through this process's authenticated CAF connections.
    auto open_pipe = [&](std::size_t from, std::size_t to) -> status {
      auto id = ask_for<std::string>(system, session.nodes[from], cluster.nodes[from],
                                     caf::make_message(actors::link_atom::value, actors::pipe_atom::value,
                                                       session.nodes[to].node()),
                                     ask.timeout);
      if (!id.ok())
        return id.err();
      auto joined = ask_for<caf::atom_value>(system, session.nodes[to], cluster.nodes[to],
                                             caf::make_message(actors::link_atom::value, actors::pipe_atom::value,
                                                               session.nodes[from].node(), *id),
                                             ask.timeout);
      if (!joined.ok())
        return joined.err();
      return status::success();
    };
    for (std::size_t a = 0; a < cluster.nodes.size(); ++a) {
      if (cluster.nodes[a].attention_devices == 0)
        continue;
      for (std::size_t e = 0; e < cluster.nodes.size(); ++e) {
        if (e == a || cluster.nodes[e].expert_devices == 0)
          continue;
        if (auto opened = open_pipe(a, e); !opened.ok())
          return opened.err();
        if (auto opened = open_pipe(e, a); !opened.ok())
          return opened.err();
      }
    }
  } else if (cluster.transport != cluster_transport::caf) {
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

  // Node to node: each attention node connects to each expert node (A2E and E2A then skip
  // this process). Over TLS this needs tls_wrap.cpp in every process: without it a node cut
  // these connections when an engine left (tls_wrap.hpp says why).
  for (std::size_t i = 0; i < cluster.nodes.size(); ++i) {
    if (cluster.nodes[i].attention_devices == 0)
      continue;
    for (std::size_t j = 0; j < cluster.nodes.size(); ++j) {
      const auto& peer = cluster.nodes[j];
      if (i == j || peer.expert_devices == 0)
        continue;
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      auto budget = std::uint32_t(std::clamp<std::int64_t>(left.count(), 1, std::int64_t{1} << 30));
      auto linked = ask_for<caf::atom_value>(
          system, session.nodes[i], cluster.nodes[i],
          caf::make_message(actors::peer_atom::value, peer.host, peer.port, peer.name, budget),
          left + std::chrono::milliseconds{1000});
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
    part.backend = cluster.nodes[i].backend;
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
