#include "node_command.hpp"

#include "actors/node_host.hpp"
#include "actors/runtime.hpp"
#include "engine/cluster.hpp"
#include "engine/cluster_config.hpp"
#include "engine_options.hpp"
#include "transport/auth_gate.hpp"
#include "transport/handshake.hpp"

#include <caf/io/all.hpp>
#include <caf/openssl/all.hpp>

#include <csignal>
#include <cstdio>
#include <memory>
#include <optional>
#include <pthread.h>
#include <stdexcept>

namespace moert::cli {
namespace {

struct node_options {
  std::string listen = "127.0.0.1:7101";
  std::string secret_file;
  std::string name;
  std::string backend = "cpu";
  std::string gemm_testbed;
  std::size_t scheduler_threads = 2;
  int heartbeat_ms = 200;
  int liveness_timeout_ms = 1500;
  cluster_tls tls;
};

int run_node(const node_options& options) {
  auto endpoint = parse_host_port(options.listen, "--listen");
  if (!endpoint.ok())
    throw std::runtime_error(endpoint.err().message);
  std::string secret;
  if (auto files = check_tls_files(options.tls); !files.ok())
    throw std::runtime_error(files.err().message);
  if (options.tls.enabled() && !options.secret_file.empty())
    throw std::runtime_error("give --secret-file or --tls-*, not both: TLS authenticates the peers itself");
  if (options.tls.enabled()) {
    // TLS verifies peers both ways; no gate.
  } else if (!options.secret_file.empty()) {
    auto loaded = transport::load_secret(options.secret_file);
    if (!loaded.ok())
      throw std::runtime_error(loaded.err().message);
    secret = std::move(*loaded);
  } else if (!transport::is_loopback(endpoint->host)) {
    throw std::runtime_error("--listen " + options.listen +
                             " is not a loopback address: a node reachable from other machines needs --secret-file "
                             "or --tls-cert/--tls-key/--tls-ca");
  }
  if (options.heartbeat_ms <= 0 || options.liveness_timeout_ms <= options.heartbeat_ms)
    throw std::runtime_error("--liveness-timeout-ms must exceed --heartbeat-ms, both positive");
  auto backend = parse_backend(options.backend);
  if (!backend.ok())
    throw std::runtime_error(backend.err().message);
  // A backend that cannot run here (no GPU) does not stop the node: every engine that asks it
  // to host is refused with the reason, so the engine's bring-up names this node and why.
  std::string unusable;
  if (auto usable = actors::check_backend(*backend); !usable.ok())
    unusable = usable.err().message;
  std::optional<policy::expert_gemm_crossover> crossover;
  if (!options.gemm_testbed.empty()) {
    auto loaded = load_gemm_crossover(options.gemm_testbed);
    if (!loaded)
      throw std::runtime_error(loaded.err().message);
    crossover = std::move(*loaded);
  }

  // Signals are taken by sigwait below: block them before CAF starts its threads.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);

  caf::actor_system_config config;
  config.set("scheduler.max-threads", options.scheduler_threads);
  // As in the engine (engine.cpp says why): device completions come from outside CAF's
  // workers, and under work stealing an idle worker polls them only every 10 ms.
  config.set("scheduler.policy", caf::atom("sharing"));
  config.set("logger.verbosity", caf::atom("quiet"));
  configure_for_cluster(config, std::chrono::milliseconds{options.heartbeat_ms},
                        std::chrono::milliseconds{options.liveness_timeout_ms}, options.tls);
  caf::actor_system system{config};
  std::string name = options.name.empty() ? options.listen : options.name;
  // The node connects to other nodes itself (node to node A2E/E2A), authenticated as the
  // engine connects to it.
  auto host = system.spawn<actors::node_host, caf::detached>(
      name,
      make_peer_connector(system, secret, options.tls.enabled(), std::chrono::milliseconds{options.liveness_timeout_ms}),
      *backend, actors::gemm_calibration_from(crossover));

  std::unique_ptr<transport::inbound_gate> gate;
  if (options.tls.enabled()) {
    auto port = caf::openssl::publish(host, endpoint->port, endpoint->host.c_str(), true);
    if (!port)
      throw std::runtime_error("cannot listen (TLS) on " + options.listen + ": " + system.render(port.error()));
  } else if (secret.empty()) {
    // Loopback without a secret: CAF listens on the address itself.
    auto port = system.middleman().publish(host, endpoint->port, endpoint->host.c_str(), true);
    if (!port)
      throw std::runtime_error("cannot listen on " + options.listen + ": " + system.render(port.error()));
  } else {
    // CAF listens on loopback only; the gate takes the public address and lets through only
    // peers that prove they hold the secret.
    auto caf_port = system.middleman().publish(host, 0, "127.0.0.1", true);
    if (!caf_port)
      throw std::runtime_error("cannot listen on loopback: " + system.render(caf_port.error()));
    auto started = transport::inbound_gate::start(endpoint->host, endpoint->port, secret, *caf_port);
    if (!started.ok())
      throw std::runtime_error(started.err().message);
    gate = std::move(*started);
  }
  std::printf("moert node %s: listening on %s (%s), backend %s\n", name.c_str(), options.listen.c_str(),
              options.tls.enabled() ? "TLS, peers verified against the CA"
              : secret.empty()      ? "loopback, no secret"
                                    : "peers must hold the shared secret",
              gpu::to_string(*backend));
  if (!unusable.empty())
    std::printf("moert node %s: error: --backend %s: %s; every request to host will be refused with this reason\n",
                name.c_str(), gpu::to_string(*backend), unusable.c_str());
  std::fflush(stdout);

  int received = 0;
  sigwait(&stop_signals, &received);
  std::printf("moert node %s: stopping (signal %d)\n", name.c_str(), received);
  caf::anon_send_exit(host, caf::exit_reason::user_shutdown);
  gate.reset();
  return 0;
}

}  // namespace

command_runner add_node_command(CLI::App& app) {
  auto options = std::make_shared<node_options>();
  CLI::App* sub = app.add_subcommand("node", "Run a node daemon hosting the shards and experts a cluster file places on it");
  sub->add_option("--listen", options->listen, "HOST:PORT to listen on (loopback unless told otherwise)")
      ->capture_default_str();
  sub->add_option("--secret-file", options->secret_file,
                  "shared secret (mode 0600): peers must prove they hold it; required off loopback");
  sub->add_option("--tls-cert", options->tls.cert_file, "TLS instead of the secret: this node's certificate (PEM)");
  sub->add_option("--tls-key", options->tls.key_file, "its private key (PEM)");
  sub->add_option("--tls-ca", options->tls.ca_file, "the CA that signed every peer's certificate (PEM)");
  sub->add_option("--name", options->name, "the node's name in reports (default: the listen address)");
  sub->add_option("--backend", options->backend,
                  "cpu|cuda: what this node's devices run (each holding its own part of the weights off cpu), "
                  "unless the cluster file names a backend for the node")
      ->capture_default_str();
  sub->add_option("--gemm-testbed", options->gemm_testbed,
                  "Testbed JSON written by `moert calibrate --backend cuda` on this machine: its expert_gemm "
                  "crossover sets the grouped/dense switch of this node's cuda devices (default: uncalibrated)");
  sub->add_option("--threads", options->scheduler_threads, "CAF scheduler threads")->capture_default_str();
  sub->add_option("--heartbeat-ms", options->heartbeat_ms, "CAF heartbeat interval")->capture_default_str();
  sub->add_option("--liveness-timeout-ms", options->liveness_timeout_ms,
                  "a peer silent this long is dead")->capture_default_str();
  return [options] { return run_node(*options); };
}

}  // namespace moert::cli
