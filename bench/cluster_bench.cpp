// The engine in one process against the same placement over three `moert node` processes
// (one attention node, two expert nodes) on loopback, over each transport: decode and
// prefill tokens/s, and the bytes each generated token costs across processes.
//
//   build/bench/moert_bench_cluster [--reps N] [--layers L] [--decode-batch B]
//
// The nodes build the same synthetic model (the bench model of `moert bench`) from its
// config and seed. For the tensor path alone against ucx_perftest: moert_bench_transport.

#include "engine/cluster_config.hpp"
#include "engine/engine.hpp"

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

using namespace moert;
using clock_type = std::chrono::steady_clock;

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

struct nodes {
  std::vector<pid_t> pids;
  ~nodes() {
    for (pid_t pid : pids)
      ::kill(pid, SIGTERM);
    for (pid_t pid : pids)
      ::waitpid(pid, nullptr, 0);
  }
};

std::string bench_model(std::size_t layers) {
  nlohmann::json c = {{"model_type", "qwen3_moe"}, {"vocab_size", 4096},       {"hidden_size", 1024},
                      {"num_hidden_layers", layers}, {"num_attention_heads", 16}, {"num_key_value_heads", 4},
                      {"head_dim", 64},            {"num_experts", 32},        {"num_experts_per_tok", 4},
                      {"moe_intermediate_size", 512}, {"intermediate_size", 2048}, {"norm_topk_prob", true},
                      {"max_position_embeddings", 4096}, {"rope_theta", 10000.0}, {"rms_norm_eps", 1e-6}};
  return c.dump();
}

struct figures {
  double decode = 0, prefill = 0;
  double caf_bytes_per_token = 0, ucx_bytes_per_token = 0, ucx_messages_per_token = 0;
  std::string error;
};

double run_once(Engine& engine, std::size_t sequences, std::size_t prompt, std::size_t new_tokens, std::uint64_t seed) {
  std::vector<std::shared_ptr<TokenStream>> streams;
  auto start = clock_type::now();
  for (std::size_t s = 0; s < sequences; ++s) {
    Request r;
    for (std::size_t t = 0; t < prompt; ++t)
      r.prompt.push_back(std::int32_t((seed * 7919 + s * 131 + t * 17) % 4096));
    r.max_new_tokens = new_tokens;
    r.ignore_eos = true;
    streams.push_back(engine.submit(std::move(r)));
  }
  for (auto& stream : streams)
    if (!stream->wait().ok())
      return -1;
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

figures measure(EngineConfig config, std::size_t reps, std::size_t batch) {
  figures out;
  auto engine = Engine::create(std::move(config));
  if (!engine.ok()) {
    out.error = engine.err().what();
    return out;
  }
  run_once(**engine, 2, 8, 2, 99);  // warm-up
  // Bytes are counted over the decode runs only: per generated token, what a step costs.
  auto before = (*engine)->report();
  std::vector<double> decode, prefill;
  for (std::size_t r = 0; r < reps; ++r) {
    // `batch` sequences, 8-token prompts, 16 new tokens: the prompt's share is small.
    double seconds = run_once(**engine, batch, 8, 16, r);
    decode.push_back(seconds > 0 ? double(batch * 16) / seconds : 0);
  }
  auto after = (*engine)->report();
  std::uint64_t generated = reps * batch * 16;
  for (std::size_t r = 0; r < reps; ++r) {
    // 8 prompts of 64 tokens, one new token each.
    double seconds = run_once(**engine, 8, 64, 1, 100 + r);
    prefill.push_back(seconds > 0 ? 8.0 * 64 / seconds : 0);
  }
  std::sort(decode.begin(), decode.end());
  std::sort(prefill.begin(), prefill.end());
  out.decode = decode[decode.size() / 2];
  out.prefill = prefill[prefill.size() / 2];
  out.caf_bytes_per_token = double(after.cluster_caf_bytes - before.cluster_caf_bytes) / double(generated);
  out.ucx_bytes_per_token = double(after.cluster_ucx_bytes - before.cluster_ucx_bytes) / double(generated);
  out.ucx_messages_per_token = double(after.cluster_ucx_messages - before.cluster_ucx_messages) / double(generated);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t reps = 3, layers = 8, batch = 16;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string arg = argv[i];
    if (arg == "--reps")
      reps = std::stoul(argv[i + 1]);
    else if (arg == "--layers")
      layers = std::stoul(argv[i + 1]);
    else if (arg == "--decode-batch")
      batch = std::stoul(argv[i + 1]);
  }
  std::signal(SIGPIPE, SIG_IGN);
  auto dir = std::filesystem::temp_directory_path() / ("moert-cluster-bench-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto secret_file = (dir / "secret").string();
  std::ofstream{secret_file} << "bench-secret-" << ::getpid() << "\n";
  ::chmod(secret_file.c_str(), 0600);

  nodes running;
  std::vector<std::uint16_t> ports{free_port(), free_port(), free_port()};
  for (auto port : ports) {
    pid_t pid = ::fork();
    if (pid == 0) {
      std::string listen = "127.0.0.1:" + std::to_string(port);
      int quiet = ::open("/dev/null", O_WRONLY);
      ::dup2(quiet, 1);
      ::execl(MOERT_BINARY, MOERT_BINARY, "node", "--listen", listen.c_str(), "--secret-file", secret_file.c_str(),
              nullptr);
      ::_exit(127);
    }
    running.pids.push_back(pid);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds{500});

  EngineConfig base;
  base.synthetic_config = bench_model(layers);
  base.weight_seed = 1;
  base.attention_devices = 1;
  base.expert_devices = 2;
  std::printf("moert cluster bench: %zu-layer bench model (hidden 1024, 32 experts top-4), 1 attention + 2 expert "
              "devices; decode %zu sequences x 16 tokens, prefill 8 x 64 tokens; median of %zu\n",
              layers, batch, reps);
  std::printf("%-22s %12s %8s %12s %8s %14s %14s %12s\n", "placement", "decode tok/s", "ratio", "prefill tok/s",
              "ratio", "CAF B/dec tok", "UCX B/dec tok", "UCX msg/tok");
  auto single = measure(base, reps, batch);
  if (!single.error.empty()) {
    std::printf("single process: %s\n", single.error.c_str());
    return 1;
  }
  std::printf("%-22s %12.1f %8.2f %12.1f %8.2f %14s %14s %12s\n", "one process", single.decode, 1.0, single.prefill,
              1.0, "-", "-", "-");
  int failures = 0;
  for (const char* transport : {"ucx-posix", "ucx-tcp", "caf"}) {
    std::string text = std::string(R"({"transport": ")") + transport + R"(", "nodes": [)" +
                       R"({"name": "a0", "address": "127.0.0.1:)" + std::to_string(ports[0]) +
                       R"(", "attention_devices": 1}, {"name": "e0", "address": "127.0.0.1:)" +
                       std::to_string(ports[1]) + R"(", "expert_devices": 1}, {"name": "e1", "address": "127.0.0.1:)" +
                       std::to_string(ports[2]) + R"(", "expert_devices": 1}]})";
    auto cluster = parse_cluster_config(text, "bench cluster");
    EngineConfig config = base;
    config.cluster = *cluster;
    std::ifstream in{secret_file};
    std::getline(in, config.cluster_secret);
    auto f = measure(config, reps, batch);
    if (!f.error.empty()) {
      std::printf("3 nodes, %-14s %s\n", transport, f.error.c_str());
      ++failures;
      continue;
    }
    std::printf("3 nodes, %-14s %12.1f %8.2f %12.1f %8.2f %14.0f %14.0f %12.2f\n", transport, f.decode,
                f.decode / single.decode, f.prefill, f.prefill / single.prefill, f.caf_bytes_per_token,
                f.ucx_bytes_per_token, f.ucx_messages_per_token);
  }
  std::printf("\nrepeat: %s --reps %zu --layers %zu --decode-batch %zu\n", argv[0], reps, layers, batch);
  std::filesystem::remove_all(dir);
  return failures ? 1 : 0;
}
