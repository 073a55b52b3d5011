// A cluster over TLS (CAF's OpenSSL module): three real `moert node` processes on loopback
// with certificates this test makes with `openssl`; tokens and every logit equal the
// single-process engine on the three fixture models, and a peer whose certificate another CA
// signed reaches nothing while the nodes serve on.

#include <catch2/catch.hpp>

#include "engine/cluster.hpp"
#include "engine/engine.hpp"
#include "engine/tls_wrap.hpp"
#include "test_support.hpp"

#include <caf/io/all.hpp>
#include <nlohmann/json.hpp>
#include <caf/openssl/all.hpp>
#include <openssl/ssl.h>

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

// Regression (tls_wrap.hpp): libcaf_openssl 0.17 never clears OpenSSL's per-thread error
// queue, so one peer that dropped its TLS connection without close_notify left an error there
// that made the next "want read" of every other TLS connection in the multiplexer thread look
// fatal: a node cut its node-to-node connections at the next heartbeat after an engine left.
// Here a server system keeps serving a client system after a third peer completes a TLS
// handshake and closes its socket abruptly.
TEST_CASE("a TLS peer that drops its connection abruptly does not cut the process's other TLS connections") {
  if (std::system("command -v openssl >/dev/null 2>&1") != 0)
    test::skip_whole_binary("openssl (the command) is not installed: cannot make test certificates");
  REQUIRE(tls_error_queue_guarded());
  certificates certs;
  auto make_config = [](caf::actor_system_config& config, const cluster_tls& tls) {
    config.set("scheduler.max-threads", 2);
    config.set("logger.verbosity", caf::atom("quiet"));
    configure_for_cluster(config, std::chrono::milliseconds{100}, std::chrono::milliseconds{1500}, tls);
  };
  caf::actor_system_config server_config;
  make_config(server_config, certs.as("node"));
  caf::actor_system server{server_config};
  auto echo = server.spawn([](caf::event_based_actor*) -> caf::behavior { return {[](std::int32_t x) { return x; }}; });
  // ~actor_system waits for every actor: stop the echo actor however the test leaves.
  std::shared_ptr<void> stop_echo{nullptr, [&](void*) { caf::anon_send_exit(echo, caf::exit_reason::user_shutdown); }};
  auto port = caf::openssl::publish(echo, 0, "127.0.0.1", true);
  REQUIRE(port);

  caf::actor_system_config client_config;
  make_config(client_config, certs.as("engine"));
  caf::actor_system client{client_config};
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds{20};
  auto link = connect_node(client, "127.0.0.1", *port, "", true, std::chrono::milliseconds{1500}, deadline);
  INFO((link.ok() ? std::string{} : link.err().message));
  REQUIRE(link.ok());
  // The answer, or what went wrong.
  auto ask = [&](std::int32_t x) {
    caf::scoped_actor self{client};
    std::string answer = "no answer";
    self->request(link->node, std::chrono::seconds{5}, x)
        .receive([&](std::int32_t y) { answer = std::to_string(y); },
                 [&](caf::error& e) { answer = "error: " + client.render(e); });
    return answer;
  };
  REQUIRE(ask(7) == "7");

  // The abrupt peer: a full TLS handshake with a trusted certificate, one read of what the
  // server sends (its BASP handshake), then close() without SSL_shutdown.
  {
    SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
    REQUIRE(ctx != nullptr);
    REQUIRE(SSL_CTX_use_certificate_chain_file(ctx, certs.file("engine.pem").c_str()) == 1);
    REQUIRE(SSL_CTX_use_PrivateKey_file(ctx, certs.file("engine.key").c_str(), SSL_FILETYPE_PEM) == 1);
    REQUIRE(SSL_CTX_load_verify_locations(ctx, certs.file("ca.pem").c_str(), nullptr) == 1);
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd >= 0);
    timeval wait{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &wait, sizeof wait);
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &wait, sizeof wait);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    address.sin_port = htons(*port);
    REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
    SSL* ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    CHECK(SSL_connect(ssl) == 1);
    char buffer[64];
    CHECK(SSL_read(ssl, buffer, sizeof buffer) > 0);
    ::close(fd);
    SSL_free(ssl);
    SSL_CTX_free(ctx);
  }
  // Without the fix the server closed the client's connection at its next read, i.e. at the
  // client's next heartbeat (100 ms): wait several, then ask again.
  std::this_thread::sleep_for(std::chrono::milliseconds{800});
  CHECK(ask(8) == "8");
  CHECK(ask(9) == "9");
}

// Over TLS too, A2E and E2A go node to node (each attention node connects to each expert node
// with its own certificate): this process's TLS connections carry control, not the rows.
TEST_CASE("over TLS, A2E and E2A go node to node: this process's connections carry control only") {
  if (std::system("command -v openssl >/dev/null 2>&1") != 0)
    test::skip_whole_binary("openssl (the command) is not installed: cannot make test certificates");
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty())
    test::skip_whole_binary("fixtures not found");
  certificates certs;
  node_processes nodes{3, certs};
  REQUIRE(nodes.all_alive());
  EngineConfig config;
  config.model_dir = dir.string();
  config.cluster = nodes.cluster(1, 2);  // transport caf: rows through this process would count
  config.tls = certs.as("engine");
  auto engine = Engine::create(config);
  INFO((engine.ok() ? std::string{} : engine.err().what()));
  REQUIRE(engine.ok());
  auto before = (*engine)->report().cluster_caf_bytes;  // bring-up: handles and the plan
  std::vector<std::shared_ptr<TokenStream>> streams;
  std::size_t tokens = 0;
  for (std::uint64_t r = 0; r < 8; ++r) {
    Request request;
    request.id = r + 1;
    for (std::size_t t = 0; t < 6 + r; ++t)
      request.prompt.push_back(std::int32_t((r * 31 + t * 7 + 3) % 100));
    request.max_new_tokens = 6;
    request.ignore_eos = true;
    tokens += request.prompt.size() + request.max_new_tokens;
    streams.push_back((*engine)->submit(std::move(request)));
  }
  for (auto& stream : streams)
    while (auto event = stream->next()) {
      INFO(event->error);
      REQUIRE(event->error.empty());
    }
  auto through = double((*engine)->report().cluster_caf_bytes - before);
  auto cfg = nlohmann::json::parse(test::slurp(dir / "config.json"));
  double row_bytes = double(tokens) * cfg["num_hidden_layers"].get<double>() *
                     cfg["num_experts_per_tok"].get<double>() * cfg["hidden_size"].get<double>() * 4 * 2;
  std::printf("TLS, node to node: %.0f bytes through this process's TLS connections for %zu tokens (%.0f B/token); "
              "the rows are %.0f bytes (%.0f B/token)\n",
              through, tokens, through / double(tokens), row_bytes, row_bytes / double(tokens));
  CHECK(through > 0);  // the count works: control does pass
  // Routed through this process, the rows would pass two of its connections: at least twice
  // row_bytes.
  CHECK(through < row_bytes / 2);
  CHECK(nodes.all_alive());
}
