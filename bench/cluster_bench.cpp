// The engine in one process against the same placement over three `moert node` processes
// (one attention node, two expert nodes) on loopback, over each transport: decode and
// prefill tokens/s, the CPU time each token costs, and the bytes it costs across processes.
// Single-process and 3-node runs alternate, round by round, so that each ratio compares runs
// that saw the same load (a shared 2-core VM's load moves every figure by 2x or more).
//
//   build/bench/moert_bench_cluster [--reps N] [--layers L] [--decode-batch B]
//                                   [--transports ucx-posix,ucx-tcp,caf] [--node-threads N]
//
// The nodes build the same synthetic model (the bench model of `moert bench`) from its
// config and seed. For the tensor path alone against ucx_perftest: moert_bench_transport.

#include "bench/bench_support.hpp"
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
#include <iterator>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using namespace moert;
using moert::bench::best;
using moert::bench::load_average;
using moert::bench::median;
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

// CPU seconds (user + system) a process has used so far; 0 when it cannot be read.
double cpu_seconds(pid_t pid) {
  std::ifstream in{"/proc/" + std::to_string(pid) + "/stat"};
  std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  auto close = text.rfind(')');  // the command name may hold spaces
  if (close == std::string::npos)
    return 0;
  std::istringstream fields{text.substr(close + 2)};
  std::string field;
  double ticks = 0;
  for (int i = 3; fields >> field; ++i)
    if (i == 14 || i == 15)
      ticks += std::stod(field);
  return ticks / double(::sysconf(_SC_CLK_TCK));
}
double cpu_seconds(const std::vector<pid_t>& pids) {
  double total = 0;
  for (pid_t pid : pids)
    total += cpu_seconds(pid);
  return total;
}


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

// One placement's runs: tokens/s of each decode and prefill run, and CPU seconds per token
// (every process of the placement) over them.
struct series {
  std::vector<double> decode, prefill;
  double decode_cpu = 0, prefill_cpu = 0;  // CPU seconds over all runs
  std::uint64_t decode_tokens = 0, prefill_tokens = 0;
};

// `batch` sequences, 8-token prompts, 16 new tokens: the prompt's share is small.
void decode_run(Engine& engine, std::size_t batch, std::uint64_t seed, const std::vector<pid_t>& pids, series& out) {
  double cpu = cpu_seconds(pids);
  double seconds = run_once(engine, batch, 8, 16, seed);
  out.decode_cpu += cpu_seconds(pids) - cpu;
  out.decode_tokens += batch * 16;
  out.decode.push_back(seconds > 0 ? double(batch * 16) / seconds : 0);
}
// 8 prompts of 64 tokens, one new token each.
void prefill_run(Engine& engine, std::uint64_t seed, const std::vector<pid_t>& pids, series& out) {
  double cpu = cpu_seconds(pids);
  double seconds = run_once(engine, 8, 64, 1, seed);
  out.prefill_cpu += cpu_seconds(pids) - cpu;
  out.prefill_tokens += 8 * 64;
  out.prefill.push_back(seconds > 0 ? 8.0 * 64 / seconds : 0);
}

// Per-round ratios (cluster run / the single-process run just before it), so that both sides
// of a ratio saw the same moment's load.
std::vector<double> ratios(const std::vector<double>& cluster, const std::vector<double>& single) {
  std::vector<double> out;
  for (std::size_t i = 0; i < cluster.size() && i < single.size(); ++i)
    out.push_back(single[i] > 0 ? cluster[i] / single[i] : 0);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t reps = 5, layers = 8, batch = 16, node_threads = 2;
  std::vector<std::string> transports{"ucx-posix", "ucx-tcp", "caf"};
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string arg = argv[i];
    if (arg == "--reps")
      reps = std::stoul(argv[i + 1]);
    else if (arg == "--layers")
      layers = std::stoul(argv[i + 1]);
    else if (arg == "--decode-batch")
      batch = std::stoul(argv[i + 1]);
    else if (arg == "--node-threads")
      node_threads = std::max<std::size_t>(1, std::stoul(argv[i + 1]));
    else if (arg == "--transports") {
      transports.clear();
      std::string list = argv[i + 1];
      for (std::size_t at = 0; at <= list.size();) {
        auto comma = std::min(list.find(',', at), list.size());
        if (comma > at)
          transports.push_back(list.substr(at, comma - at));
        at = comma + 1;
      }
    } else {
      std::fprintf(stderr, "unknown option %s\n", arg.c_str());
      return 2;
    }
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
      std::string threads = std::to_string(node_threads);
      ::execl(MOERT_BINARY, MOERT_BINARY, "node", "--listen", listen.c_str(), "--secret-file", secret_file.c_str(),
              "--threads", threads.c_str(), nullptr);
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
              "devices; decode %zu sequences x 16 tokens, prefill 8 x 64 tokens; %zu rounds, each a single-process "
              "run and then a 3-node run (after one unmeasured round of each); %zu CAF threads per node\n",
              layers, batch, reps, node_threads);
  std::printf("load average before: %s\n", load_average().c_str());
  auto single = Engine::create(base);
  if (!single.ok()) {
    std::printf("single process: %s\n", single.err().what().c_str());
    return 1;
  }
  std::vector<pid_t> self{::getpid()}, cluster_pids{::getpid()};
  cluster_pids.insert(cluster_pids.end(), running.pids.begin(), running.pids.end());

  std::printf("%-18s | %15s %11s %5s | %15s %11s %5s | %11s %11s %11s %11s\n", "placement", "decode tok/s",
              "ratio", "CPU", "prefill tok/s", "ratio", "CPU", "CAF B/tok", "UCX B/tok", "UCX msg", "of them E2A");
  std::printf("%-18s | %15s %11s %5s | %15s %11s %5s | %11s %11s %11s %11s\n", "", "median / best", "med / best",
              "ms/t", "median / best", "med / best", "ms/t", "decode", "decode", "per tok", "per tok");
  auto row = [&](const std::string& name, const series& f, const series* paired, double caf, double ucx,
                 double messages, double e2a) {
    auto r_decode = paired ? ratios(f.decode, paired->decode) : std::vector<double>(f.decode.size(), 1.0);
    auto r_prefill = paired ? ratios(f.prefill, paired->prefill) : std::vector<double>(f.prefill.size(), 1.0);
    std::printf("%-18s | %7.1f %7.1f %5.2f %5.2f %5.1f | %7.1f %7.1f %5.2f %5.2f %5.1f | ", name.c_str(),
                median(f.decode), best(f.decode), median(r_decode), best(r_decode),
                1e3 * f.decode_cpu / double(std::max<std::uint64_t>(1, f.decode_tokens)), median(f.prefill),
                best(f.prefill), median(r_prefill), best(r_prefill),
                1e3 * f.prefill_cpu / double(std::max<std::uint64_t>(1, f.prefill_tokens)));
    if (paired)
      std::printf("%11.0f %11.0f %11.2f %11.2f\n", caf, ucx, messages, e2a);
    else
      std::printf("%11s %11s %11s %11s\n", "-", "-", "-", "-");
  };

  int failures = 0;
  for (const auto& transport : transports) {
    std::string text = std::string(R"({"transport": ")") + transport + R"(", "nodes": [)" +
                       R"({"name": "a0", "address": "127.0.0.1:)" + std::to_string(ports[0]) +
                       R"(", "attention_devices": 1}, {"name": "e0", "address": "127.0.0.1:)" +
                       std::to_string(ports[1]) + R"(", "expert_devices": 1}, {"name": "e1", "address": "127.0.0.1:)" +
                       std::to_string(ports[2]) + R"(", "expert_devices": 1}]})";
    auto cluster_config = parse_cluster_config(text, "bench cluster");
    if (!cluster_config.ok()) {
      std::printf("3 nodes, %-9s %s\n", transport.c_str(), cluster_config.err().what().c_str());
      ++failures;
      continue;
    }
    EngineConfig config = base;
    config.cluster = *cluster_config;
    std::ifstream in{secret_file};
    std::getline(in, config.cluster_secret);
    auto cluster = Engine::create(std::move(config));
    if (!cluster.ok()) {
      std::printf("3 nodes, %-9s %s\n", transport.c_str(), cluster.err().what().c_str());
      ++failures;
      continue;
    }
    series one, three;
    {
      // Warm-up, unmeasured: a whole round of each (first-touch pages of the KV caches and
      // row pools, UCX's first rendezvous, CAF's first connections), so round 1 is like the rest.
      series discard;
      decode_run(**single, batch, 99, self, discard);
      decode_run(**cluster, batch, 99, cluster_pids, discard);
      prefill_run(**single, 199, self, discard);
      prefill_run(**cluster, 199, cluster_pids, discard);
    }
    // Bytes are counted over the decode runs only: per generated token, what a step costs.
    auto before = (*cluster)->report();
    for (std::size_t r = 0; r < reps; ++r) {
      decode_run(**single, batch, r, self, one);
      decode_run(**cluster, batch, r, cluster_pids, three);
    }
    auto after = (*cluster)->report();
    for (std::size_t r = 0; r < reps; ++r) {
      prefill_run(**single, 100 + r, self, one);
      prefill_run(**cluster, 100 + r, cluster_pids, three);
    }
    double generated = double(std::max<std::uint64_t>(1, three.decode_tokens));
    row("one process", one, nullptr, 0, 0, 0, 0);
    row("3 nodes, " + transport, three, &one, double(after.cluster_caf_bytes - before.cluster_caf_bytes) / generated,
        double(after.cluster_ucx_bytes - before.cluster_ucx_bytes) / generated,
        double(after.cluster_ucx_messages - before.cluster_ucx_messages) / generated,
        double(after.cluster_ucx_e2a_messages - before.cluster_ucx_e2a_messages) / generated);
    std::fflush(stdout);
  }
  std::printf("load average after: %s\n", load_average().c_str());
  std::printf("ratio: 3-node run / the single-process run of the same round (median and best over rounds); CPU: "
              "ms of CPU (user + system, every process of the placement) per token\n");
  std::string listed;
  for (const auto& transport : transports)
    listed += (listed.empty() ? "" : ",") + transport;
  std::printf("\nrepeat: %s --reps %zu --layers %zu --decode-batch %zu --transports %s --node-threads %zu\n", argv[0],
              reps, layers, batch, listed.c_str(), node_threads);
  std::filesystem::remove_all(dir);
  return failures ? 1 : 0;
}
