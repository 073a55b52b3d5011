#pragma once

// A cluster file: which node processes exist, where they listen, what each hosts, and which
// engine carries tensor bytes between them (configs/clusters/README.md documents every key).
//
//   {"transport": "ucx-tcp",
//    "nodes": [{"name": "a0", "address": "127.0.0.1:7101", "attention_devices": 1},
//              {"name": "e0", "address": "127.0.0.1:7102", "expert_devices": 1}]}
//
// Attention shards are numbered through the nodes in file order, and so are expert devices;
// experts go round-robin over the expert devices, as in one process, so a placement gives
// the same tokens in one process and across nodes. Parsing validates everything and names
// the bad key; nothing here opens a socket.
//
// Thread safety: plain values.

#include "core/error.hpp"

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace moert {

// nccl: rows GPU to GPU between cuda nodes ([F]); parsed, but bring-up refuses it with the
// reason (no GPU here, or its row path not wired yet).
enum class cluster_transport { ucx_tcp, ucx_posix, caf, nccl };
const char* to_string(cluster_transport transport);

struct cluster_node {
  std::string name;
  std::string host;
  std::uint16_t port = 0;
  std::size_t attention_devices = 0;
  std::size_t expert_devices = 0;
  // What the node's devices run: "cpu", "cuda", or "" (unset) for the node's own
  // `moert node --backend`.
  std::string backend;
};

struct cluster_config {
  cluster_transport transport = cluster_transport::caf;
  std::vector<cluster_node> nodes;
  // Liveness: CAF heartbeats every `heartbeat`, a silent peer is dead after `liveness_timeout`.
  std::chrono::milliseconds heartbeat{200};
  std::chrono::milliseconds liveness_timeout{1500};

  std::size_t attention_devices() const;
  std::size_t expert_devices() const;
  // The node hosting global attention shard `shard_idx` / expert device `device_idx`.
  std::size_t node_of_shard(std::size_t shard_idx) const;
  std::size_t node_of_expert_device(std::size_t device_idx) const;
};

// TLS files for a cluster connection (PEM): empty cert means no TLS.
struct cluster_tls {
  std::string cert_file, key_file, ca_file;
  bool enabled() const { return !cert_file.empty(); }
};
// Every file given and readable, or the error naming the missing one.
status check_tls_files(const cluster_tls& tls);

result<cluster_config> parse_cluster_config(const std::string& json_text, const std::string& source);
result<cluster_config> load_cluster_config(const std::string& path);

// "HOST:PORT" (IPv6 as "[::1]:PORT"); errors name `what`.
struct host_port {
  std::string host;
  std::uint16_t port = 0;
};
result<host_port> parse_host_port(const std::string& text, const std::string& what);

}  // namespace moert
