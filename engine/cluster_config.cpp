#include "engine/cluster_config.hpp"

#include "gpu/backend.hpp"

#include <nlohmann/json.hpp>

#include <fstream>
#include <iterator>
#include <set>

namespace moert {
namespace {

using json = nlohmann::json;

constexpr std::size_t max_devices_per_node = 256;

error fail(const std::string& source, const std::string& key, const std::string& what) {
  return make_error(error_code::invalid_config, source + ": '" + key + "' " + what);
}

result<std::size_t> device_count(const json& node, const char* key, const std::string& source,
                                 const std::string& path) {
  auto it = node.find(key);
  if (it == node.end())
    return std::size_t{0};
  if (!it->is_number_integer() || it->get<std::int64_t>() < 0 ||
      it->get<std::int64_t>() > static_cast<std::int64_t>(max_devices_per_node))
    return fail(source, path + key, "must be an integer from 0 to " + std::to_string(max_devices_per_node));
  return static_cast<std::size_t>(it->get<std::int64_t>());
}

result<std::chrono::milliseconds> milliseconds(const json& root, const char* key, std::chrono::milliseconds fallback,
                                               const std::string& source) {
  auto it = root.find(key);
  if (it == root.end())
    return fallback;
  if (!it->is_number_integer() || it->get<std::int64_t>() < 1 || it->get<std::int64_t>() > 600000)
    return fail(source, key, "must be an integer number of milliseconds from 1 to 600000");
  return std::chrono::milliseconds{it->get<std::int64_t>()};
}

}  // namespace

const char* to_string(cluster_transport transport) {
  switch (transport) {
    case cluster_transport::ucx_tcp: return "ucx-tcp";
    case cluster_transport::ucx_posix: return "ucx-posix";
    case cluster_transport::caf: return "caf";
    case cluster_transport::nccl: return "nccl";
  }
  return "?";
}

result<host_port> parse_host_port(const std::string& text, const std::string& what) {
  std::string host, port;
  if (!text.empty() && text.front() == '[') {
    auto close = text.find(']');
    if (close == std::string::npos || close + 1 >= text.size() || text[close + 1] != ':')
      return make_error(error_code::invalid_argument, what + " '" + text + "' is not [IPv6]:PORT");
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    auto colon = text.rfind(':');
    if (colon == std::string::npos || colon == 0)
      return make_error(error_code::invalid_argument, what + " '" + text + "' is not HOST:PORT");
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
  }
  if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos ||
      std::stoul(port) == 0 || std::stoul(port) > 65535)
    return make_error(error_code::invalid_argument, what + " '" + text + "': the port must be 1 to 65535");
  return host_port{host, static_cast<std::uint16_t>(std::stoul(port))};
}

std::size_t cluster_config::attention_devices() const {
  std::size_t n = 0;
  for (const auto& node : nodes)
    n += node.attention_devices;
  return n;
}

std::size_t cluster_config::expert_devices() const {
  std::size_t n = 0;
  for (const auto& node : nodes)
    n += node.expert_devices;
  return n;
}

std::size_t cluster_config::node_of_shard(std::size_t shard_idx) const {
  for (std::size_t i = 0; i < nodes.size(); ++i) {
    if (shard_idx < nodes[i].attention_devices)
      return i;
    shard_idx -= nodes[i].attention_devices;
  }
  return nodes.size();
}

std::size_t cluster_config::node_of_expert_device(std::size_t device_idx) const {
  for (std::size_t i = 0; i < nodes.size(); ++i) {
    if (device_idx < nodes[i].expert_devices)
      return i;
    device_idx -= nodes[i].expert_devices;
  }
  return nodes.size();
}

result<cluster_config> parse_cluster_config(const std::string& json_text, const std::string& source) {
  json root = json::parse(json_text, nullptr, false);
  if (root.is_discarded() || !root.is_object())
    return make_error(error_code::invalid_config, source + ": not a JSON object");
  for (const auto& [key, value] : root.items())
    if (key != "transport" && key != "nodes" && key != "heartbeat_ms" && key != "liveness_timeout_ms")
      return fail(source, key, "is not a known key (transport, nodes, heartbeat_ms, liveness_timeout_ms)");

  cluster_config config;
  auto transport = root.find("transport");
  if (transport == root.end() || !transport->is_string())
    return fail(source, "transport", "is missing: one of \"ucx-tcp\", \"ucx-posix\", \"caf\", \"nccl\"");
  auto name = transport->get<std::string>();
  if (name == "ucx-tcp")
    config.transport = cluster_transport::ucx_tcp;
  else if (name == "ucx-posix")
    config.transport = cluster_transport::ucx_posix;
  else if (name == "caf")
    config.transport = cluster_transport::caf;
  else if (name == "nccl")
    config.transport = cluster_transport::nccl;
  else
    return fail(source, "transport", "is \"" + name + "\": one of \"ucx-tcp\", \"ucx-posix\", \"caf\", \"nccl\"");

  auto heartbeat = milliseconds(root, "heartbeat_ms", config.heartbeat, source);
  if (!heartbeat.ok())
    return heartbeat.err();
  auto timeout = milliseconds(root, "liveness_timeout_ms", config.liveness_timeout, source);
  if (!timeout.ok())
    return timeout.err();
  config.heartbeat = *heartbeat;
  config.liveness_timeout = *timeout;
  if (config.liveness_timeout <= config.heartbeat)
    return fail(source, "liveness_timeout_ms", "must be longer than heartbeat_ms");

  auto nodes = root.find("nodes");
  if (nodes == root.end() || !nodes->is_array() || nodes->empty())
    return fail(source, "nodes", "must be a non-empty array");
  std::set<std::string> names, addresses;
  for (std::size_t i = 0; i < nodes->size(); ++i) {
    const json& node = (*nodes)[i];
    std::string path = "nodes[" + std::to_string(i) + "].";
    if (!node.is_object())
      return fail(source, path.substr(0, path.size() - 1), "must be an object");
    for (const auto& [key, value] : node.items())
      if (key != "name" && key != "address" && key != "attention_devices" && key != "expert_devices" &&
          key != "backend")
        return fail(source, path + key,
                    "is not a known key (name, address, attention_devices, expert_devices, backend)");
    cluster_node parsed;
    auto node_name = node.find("name");
    if (node_name == node.end() || !node_name->is_string() || node_name->get<std::string>().empty())
      return fail(source, path + "name", "must be a non-empty string");
    parsed.name = node_name->get<std::string>();
    if (!names.insert(parsed.name).second)
      return fail(source, path + "name", "\"" + parsed.name + "\" names two nodes");
    auto address = node.find("address");
    if (address == node.end() || !address->is_string())
      return fail(source, path + "address", "must be a \"HOST:PORT\" string");
    auto endpoint = parse_host_port(address->get<std::string>(), source + ": '" + path + "address'");
    if (!endpoint.ok())
      return make_error(error_code::invalid_config, endpoint.err().message);
    if (!addresses.insert(address->get<std::string>()).second)
      return fail(source, path + "address", "\"" + address->get<std::string>() + "\" is used by two nodes");
    parsed.host = endpoint->host;
    parsed.port = endpoint->port;
    auto attention = device_count(node, "attention_devices", source, path);
    if (!attention.ok())
      return attention.err();
    auto experts = device_count(node, "expert_devices", source, path);
    if (!experts.ok())
      return experts.err();
    parsed.attention_devices = *attention;
    parsed.expert_devices = *experts;
    if (auto backend = node.find("backend"); backend != node.end()) {
      if (!backend->is_string() || !gpu::parse_backend_kind(backend->get<std::string>()))
        return fail(source, path + "backend", "must be \"cpu\" or \"cuda\"");
      parsed.backend = backend->get<std::string>();
    }
    if (parsed.attention_devices + parsed.expert_devices == 0)
      return fail(source, path.substr(0, path.size() - 1), "hosts nothing: give attention_devices or expert_devices");
    config.nodes.push_back(std::move(parsed));
  }
  if (config.attention_devices() == 0)
    return fail(source, "nodes", "have no attention_devices: a cluster needs at least one");
  if (config.expert_devices() == 0)
    return fail(source, "nodes", "have no expert_devices: a cluster needs at least one");
  return config;
}

status check_tls_files(const cluster_tls& tls) {
  if (!tls.enabled() && tls.key_file.empty() && tls.ca_file.empty())
    return status::success();
  for (auto [flag, file] : {std::pair{"--tls-cert", &tls.cert_file}, std::pair{"--tls-key", &tls.key_file},
                            std::pair{"--tls-ca", &tls.ca_file}}) {
    if (file->empty())
      return make_error(error_code::invalid_argument, std::string("TLS needs ") + flag + " too");
    if (!std::ifstream{*file})
      return make_error(error_code::io_error, std::string(flag) + " " + *file + ": cannot be read");
  }
  return status::success();
}

result<cluster_config> load_cluster_config(const std::string& path) {
  std::ifstream in{path};
  if (!in)
    return make_error(error_code::io_error, "cluster file " + path + ": cannot be opened");
  std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  return parse_cluster_config(text, path);
}

}  // namespace moert
