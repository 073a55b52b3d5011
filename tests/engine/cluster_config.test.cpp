#include <catch2/catch.hpp>

#include "engine/cluster_config.hpp"

#include <filesystem>

using namespace moert;

namespace {

std::string error_of(const std::string& text) {
  auto parsed = parse_cluster_config(text, "c.json");
  REQUIRE_FALSE(parsed.ok());
  return parsed.err().message;
}

}  // namespace

TEST_CASE("the issue's minimal cluster file parses as written") {
  auto parsed = parse_cluster_config(R"({"transport": "ucx-tcp",
     "nodes": [{"name": "a0", "address": "127.0.0.1:7101", "attention_devices": 1},
               {"name": "e0", "address": "127.0.0.1:7102", "expert_devices": 1},
               {"name": "e1", "address": "127.0.0.1:7103", "expert_devices": 1}]})",
                                     "c.json");
  REQUIRE(parsed.ok());
  CHECK(parsed->transport == cluster_transport::ucx_tcp);
  REQUIRE(parsed->nodes.size() == 3);
  CHECK(parsed->nodes[2].host == "127.0.0.1");
  CHECK(parsed->nodes[2].port == 7103);
  CHECK(parsed->attention_devices() == 1);
  CHECK(parsed->expert_devices() == 2);
  CHECK(parsed->node_of_shard(0) == 0);
  CHECK(parsed->node_of_expert_device(0) == 1);
  CHECK(parsed->node_of_expert_device(1) == 2);
  CHECK(parsed->heartbeat.count() > 0);
  CHECK(parsed->liveness_timeout <= std::chrono::milliseconds{2000});  // the issue's default bound
}

TEST_CASE("the shipped cluster examples parse") {
  for (const auto& entry : std::filesystem::directory_iterator{std::filesystem::path{MOERT_SOURCE_DIR} / "configs/clusters"})
    if (entry.path().extension() == ".json") {
      INFO(entry.path());
      auto parsed = load_cluster_config(entry.path().string());
      CHECK(parsed.ok());
    }
}

TEST_CASE("malformed cluster files name the bad key") {
  CHECK_THAT(error_of("[1]"), Catch::Contains("not a JSON object"));
  CHECK_THAT(error_of(R"({"transport": "ucx-rdma", "nodes": []})"), Catch::Contains("'transport'"));
  CHECK_THAT(error_of(R"({"nodes": []})"), Catch::Contains("'transport' is missing"));
  CHECK_THAT(error_of(R"({"transport": "caf", "nodes": []})"), Catch::Contains("'nodes'"));
  CHECK_THAT(error_of(R"({"transport": "caf", "nodez": []})"), Catch::Contains("'nodez' is not a known key"));
  const std::string ok_expert = R"({"name": "e", "address": "127.0.0.1:2", "expert_devices": 1})";
  CHECK_THAT(error_of(R"({"transport": "caf", "nodes": [{"name": "a", "address": "127.0.0.1", "attention_devices": 1}, )" + ok_expert + "]}"),
             Catch::Contains("'nodes[0].address'"));
  CHECK_THAT(error_of(R"({"transport": "caf", "nodes": [{"name": "a", "address": "h:70000", "attention_devices": 1}, )" + ok_expert + "]}"),
             Catch::Contains("port must be 1 to 65535"));
  CHECK_THAT(error_of(R"({"transport": "caf", "nodes": [{"name": "e", "address": "h:1", "attention_devices": 1}, )" + ok_expert + "]}"),
             Catch::Contains("names two nodes"));
  CHECK_THAT(error_of(R"({"transport": "caf", "nodes": [{"name": "a", "address": "127.0.0.1:2", "attention_devices": 1}, )" + ok_expert + "]}"),
             Catch::Contains("used by two nodes"));
  CHECK_THAT(error_of(R"({"transport": "caf", "nodes": [{"name": "a", "address": "h:1", "attention_devices": -1}, )" + ok_expert + "]}"),
             Catch::Contains("'nodes[0].attention_devices'"));
  CHECK_THAT(error_of(R"({"transport": "caf", "nodes": [{"name": "a", "address": "h:1"}, )" + ok_expert + "]}"),
             Catch::Contains("hosts nothing"));
  CHECK_THAT(error_of(R"({"transport": "caf", "nodes": [)" + ok_expert + "]}"), Catch::Contains("no attention_devices"));
  CHECK_THAT(error_of(R"({"transport": "caf", "nodes": [{"name": "a", "address": "h:1", "attention_devices": 1, "gpus": 2}, )" + ok_expert + "]}"),
             Catch::Contains("'nodes[0].gpus' is not a known key"));
  CHECK_THAT(error_of(R"({"transport": "caf", "heartbeat_ms": 500, "liveness_timeout_ms": 100, "nodes": [{"name": "a", "address": "h:1", "attention_devices": 1}, )" + ok_expert + "]}"),
             Catch::Contains("longer than heartbeat_ms"));
  CHECK_FALSE(load_cluster_config("/nonexistent/cluster.json").ok());
}

TEST_CASE("HOST:PORT, IPv6 in brackets") {
  auto v6 = parse_host_port("[::1]:7101", "address");
  REQUIRE(v6.ok());
  CHECK(v6->host == "::1");
  CHECK(v6->port == 7101);
  CHECK_FALSE(parse_host_port("[::1]7101", "address").ok());
  CHECK_FALSE(parse_host_port(":7101", "address").ok());
  CHECK_FALSE(parse_host_port("host:", "address").ok());
  CHECK_FALSE(parse_host_port("host:12a", "address").ok());
}
