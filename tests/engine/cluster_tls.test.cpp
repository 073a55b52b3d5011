// A cluster over TLS (CAF's OpenSSL module): three real `moert node` processes on loopback
// with certificates this test makes with `openssl`; tokens and every logit equal the
// single-process engine on the three fixture models, and a peer whose certificate another CA
// signed reaches nothing while the nodes serve on.

#include <catch2/catch.hpp>

#include "engine/engine.hpp"
#include "test_support.hpp"

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

using namespace moert;
namespace fs = std::filesystem;

namespace {

std::uint16_t free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address);
  socklen_t length = sizeof address;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  ::close(fd);
  return ntohs(address.sin_port);
}

// A CA, and certificates it (or a second, untrusted CA) signed.
struct certificates {
  fs::path dir;
  certificates() : dir(fs::temp_directory_path() / ("moert-tls-" + std::to_string(::getpid()))) {
    fs::create_directories(dir);
    std::string d = dir.string();
    std::string script =
        "cd " + d + " && set -e && "
        "ca() { openssl req -x509 -newkey rsa:2048 -nodes -keyout $1.key -out $1.pem -days 1 -subj /CN=$1; } && "
        "cert() { openssl req -newkey rsa:2048 -nodes -keyout $1.key -out $1.csr -subj /CN=$1 && "
        "openssl x509 -req -in $1.csr -CA $2.pem -CAkey $2.key -CAcreateserial -out $1.pem -days 1; } && "
        "ca ca && ca other && cert node ca && cert engine ca && cert intruder other";
    REQUIRE(std::system(("(" + script + ") >/dev/null 2>&1").c_str()) == 0);
  }
  ~certificates() { fs::remove_all(dir); }
  std::string file(const std::string& name) const { return (dir / name).string(); }
  cluster_tls as(const std::string& who) const { return {file(who + ".pem"), file(who + ".key"), file("ca.pem")}; }
};

struct node_processes {
  std::vector<pid_t> pids;
  std::vector<std::uint16_t> ports;
  // `start_delay`: each node process waits that long before it starts (and listens).
  node_processes(std::size_t count, const certificates& certs,
                 std::chrono::milliseconds start_delay = std::chrono::milliseconds{0}) {
    for (std::size_t i = 0; i < count; ++i) {
      ports.push_back(free_port());
      std::string listen = "127.0.0.1:" + std::to_string(ports.back());
      pid_t pid = ::fork();
      if (pid == 0) {
        if (start_delay.count() > 0)
          ::usleep(useconds_t(start_delay.count() * 1000));
        ::execl(MOERT_BINARY, MOERT_BINARY, "node", "--listen", listen.c_str(), "--tls-cert",
                certs.file("node.pem").c_str(), "--tls-key", certs.file("node.key").c_str(), "--tls-ca",
                certs.file("ca.pem").c_str(), nullptr);
        ::_exit(127);
      }
      pids.push_back(pid);
    }
    if (start_delay.count() == 0)
      std::this_thread::sleep_for(std::chrono::milliseconds{500});
  }
  ~node_processes() {
    for (pid_t pid : pids)
      ::kill(pid, SIGKILL);
    for (pid_t pid : pids)
      ::waitpid(pid, nullptr, 0);
  }
  bool all_alive() const {
    for (pid_t pid : pids)
      if (::waitpid(pid, nullptr, WNOHANG) != 0)
        return false;
    return true;
  }
  // The first `attention` nodes host a shard each, the next `experts` an expert device each.
  cluster_config cluster(std::size_t attention = 1, std::size_t experts = 2) const {
    REQUIRE(attention + experts <= ports.size());
    std::string text = R"({"transport": "caf", "nodes": [)";
    for (std::size_t i = 0; i < attention + experts; ++i) {
      bool shard = i < attention;
      text += std::string(i ? ", " : "") + R"({"name": ")" + (shard ? "a" : "e") +
              std::to_string(shard ? i : i - attention) + R"(", "address": "127.0.0.1:)" + std::to_string(ports[i]) +
              R"(", ")" + (shard ? "attention_devices" : "expert_devices") + R"(": 1})";
    }
    text += "]}";
    auto parsed = parse_cluster_config(text, "tls cluster");
    REQUIRE(parsed.ok());
    return *parsed;
  }
};

struct output {
  std::vector<std::int32_t> tokens;
  std::vector<std::vector<float>> logits;
};

std::vector<output> run(const EngineConfig& config, std::size_t vocab) {
  auto engine = Engine::create(config);
  INFO((engine.ok() ? std::string{} : engine.err().what()));
  REQUIRE(engine.ok());
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (std::uint64_t r = 0; r < 3; ++r) {
    Request request;
    request.id = r + 1;
    for (std::size_t t = 0; t < 5 + r * 3; ++t)
      request.prompt.push_back(std::int32_t((r * 31 + t * 7 + 3) % vocab));
    request.max_new_tokens = 5;
    request.ignore_eos = true;
    request.return_logits = true;
    request.return_prompt_logits = true;
    if (r == 2)
      request.sampling = {0.8f, 20, 0.9f, 7};
    streams.push_back((*engine)->submit(std::move(request)));
  }
  std::vector<output> out;
  for (auto& stream : streams) {
    output o;
    while (auto event = stream->next()) {
      INFO(event->error);
      REQUIRE(event->error.empty());
      if (event->token >= 0)
        o.tokens.push_back(event->token);
      if (!event->prompt_logits.empty())
        o.logits.push_back(event->prompt_logits);
      if (!event->logits.empty())
        o.logits.push_back(event->logits);
    }
    out.push_back(std::move(o));
  }
  return out;
}

}  // namespace

TEST_CASE("a TLS cluster gives the single-process tokens and logits; an untrusted certificate gets nowhere") {
  if (std::system("command -v openssl >/dev/null 2>&1") != 0)
    test::skip_whole_binary("openssl (the command) is not installed: cannot make test certificates");
  certificates certs;
  node_processes nodes{5, certs};
  REQUIRE(nodes.all_alive());

  for (const char* fixture : {"qwen3_moe_tiny", "mixtral_tiny", "deepseek_v2_tiny"}) {
    auto dir = test::fixture_dir(fixture);
    if (dir.empty())
      test::skip_whole_binary("fixtures not found");
    INFO(fixture);
    EngineConfig single;
    single.model_dir = dir.string();
    single.attention_devices = 1;
    single.expert_devices = 2;
    auto vocab = Engine::create(single).value()->vocab_size();
    auto expected = run(single, vocab);

    for (auto [attention, experts] : {std::pair<std::size_t, std::size_t>{1, 2}, {2, 3}}) {
      INFO(attention << " attention + " << experts << " expert nodes");
      EngineConfig one_process = single;
      one_process.attention_devices = attention;
      one_process.expert_devices = experts;
      auto expected_here = attention == 1 ? expected : run(one_process, vocab);
      EngineConfig clustered = single;
      clustered.cluster = nodes.cluster(attention, experts);
      clustered.tls = certs.as("engine");
      auto got = run(clustered, vocab);
      REQUIRE(got.size() == expected_here.size());
      for (std::size_t r = 0; r < got.size(); ++r) {
        CHECK(got[r].tokens == expected_here[r].tokens);
        CHECK(got[r].logits == expected_here[r].logits);  // bit for bit
      }
    }
  }

  EngineConfig intruder;
  intruder.model_dir = test::fixture_dir("qwen3_moe_tiny").string();
  intruder.cluster = nodes.cluster();
  intruder.tls = {certs.file("intruder.pem"), certs.file("intruder.key"), certs.file("ca.pem")};
  intruder.cluster_timeout = std::chrono::milliseconds{5000};
  auto start = std::chrono::steady_clock::now();
  auto refused = Engine::create(intruder);
  REQUIRE_FALSE(refused.ok());
  CHECK_THAT(refused.err().message, Catch::Contains("node a0"));
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds{10});

  // The nodes serve on: a trusted engine still gets its tokens.
  EngineConfig again;
  again.model_dir = test::fixture_dir("qwen3_moe_tiny").string();
  again.cluster = nodes.cluster();
  again.tls = certs.as("engine");
  CHECK(run(again, 100).size() == 3);
  CHECK(nodes.all_alive());

  // Missing TLS files are named.
  EngineConfig missing = again;
  missing.tls.key_file = "/nonexistent/key.pem";
  auto bad = Engine::create(missing);
  REQUIRE_FALSE(bad.ok());
  CHECK_THAT(bad.err().message, Catch::Contains("/nonexistent/key.pem"));
}

// Regression: nodes started together with the caller may not listen yet; bring-up used to
// fail at once with "ip_connect failed" (seen under load in CI) instead of waiting for them.
TEST_CASE("bring-up waits, within the cluster timeout, for nodes that do not listen yet") {
  if (std::system("command -v openssl >/dev/null 2>&1") != 0)
    test::skip_whole_binary("openssl (the command) is not installed: cannot make test certificates");
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty())
    test::skip_whole_binary("fixtures not found");
  certificates certs;
  EngineConfig single;
  single.model_dir = dir.string();
  single.attention_devices = 1;
  single.expert_devices = 2;
  auto expected = run(single, 100);

  node_processes late{3, certs, std::chrono::milliseconds{1500}};
  EngineConfig clustered = single;
  clustered.cluster = late.cluster(1, 2);
  clustered.tls = certs.as("engine");
  clustered.cluster_timeout = std::chrono::milliseconds{20000};
  auto got = run(clustered, 100);
  REQUIRE(got.size() == expected.size());
  for (std::size_t r = 0; r < got.size(); ++r) {
    CHECK(got[r].tokens == expected[r].tokens);
    CHECK(got[r].logits == expected[r].logits);
  }
}
