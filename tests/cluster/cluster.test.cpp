// Clusters as users run them: real `moert node` processes on loopback, an Engine in this
// process whose shards and expert devices live in those nodes (EngineConfig::cluster), and a
// shared secret in a 0600 file. Tokens and every logit must be bit-identical to the
// single-process engine with the same numbers of devices, over every transport; a node
// killed or stopped mid-generation must end every request with an error naming it, within
// the liveness bound. Every wait has a timeout; every node is killed at the end (RAII, and
// PR_SET_PDEATHSIG should this process die first).
#include <catch2/catch.hpp>

#include "engine/cluster_config.hpp"
#include "engine/engine.hpp"
#include "test_support.hpp"

#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace moert;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

namespace {

const char* const transports[] = {"caf", "ucx-tcp", "ucx-posix"};

double ms_between(steady::time_point from, steady::time_point to) {
  return std::chrono::duration<double, std::milli>(to - from).count();
}

fs::path scratch_dir() {
  static const fs::path dir = [] {
    fs::path d = fs::temp_directory_path() / ("moert_cluster_test_" + std::to_string(::getpid()));
    fs::remove_all(d);
    fs::create_directories(d);
    return d;
  }();
  return dir;
}

using moert::test::slurp;

std::string tail(const std::string& text, std::size_t n) {
  return text.size() <= n ? text : "..." + text.substr(text.size() - n);
}

void write_file(const fs::path& path, const std::string& text, mode_t mode) {
  {
    std::ofstream out{path, std::ios::trunc};
    out << text;
  }
  REQUIRE(::chmod(path.c_str(), mode) == 0);
}

// The secret file every node and engine of this test share (mode 0600, as `moert node` demands).
const std::string& cluster_secret() {
  static const std::string secret = "moert-cluster-test-" + std::to_string(::getpid()) + "-c0ffee";
  return secret;
}

fs::path secret_file() {
  static const fs::path path = [] {
    fs::path p = scratch_dir() / "secret";
    write_file(p, cluster_secret() + "\n", 0600);
    return p;
  }();
  return path;
}

// `count` distinct loopback ports free right now: bind port 0, read what the kernel chose,
// and keep every socket open until all are chosen so none is handed out twice. A node may
// still lose its port to another process before it binds; node_process retries then.
std::vector<std::uint16_t> free_ports(std::size_t count) {
  std::vector<int> sockets;
  std::vector<std::uint16_t> ports;
  for (std::size_t i = 0; i < count; ++i) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd >= 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    socklen_t len = sizeof addr;
    REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
    ports.push_back(ntohs(addr.sin_port));
    sockets.push_back(fd);
  }
  for (int fd : sockets)
    ::close(fd);
  return ports;
}

// Every child still alive, so that a hang found by `bounded` can kill them before exiting.
std::mutex children_mutex;
std::set<pid_t> children;

void kill_all_children() {
  std::lock_guard lock{children_mutex};
  for (pid_t pid : children) {
    ::kill(pid, SIGCONT);
    ::kill(pid, SIGKILL);
  }
}

// Runs `fn` on a thread and waits `limit` for it. A hang is a failure no test may survive:
// print what hung, kill the nodes and leave (ctest sees the exit code and the message).
template <class Fn>
void bounded(const std::string& what, std::chrono::milliseconds limit, Fn&& fn) {
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  std::thread worker{[&] {
    fn();
    std::lock_guard lock{m};
    done = true;
    cv.notify_all();
  }};
  std::unique_lock lock{m};
  if (!cv.wait_for(lock, limit, [&] { return done; })) {
    std::printf("HANG: %s did not return within %lld ms\n", what.c_str(), static_cast<long long>(limit.count()));
    std::fflush(stdout);
    kill_all_children();
    std::_Exit(3);
  }
  lock.unlock();
  worker.join();
}

// A `moert node` child process, its output in a log file.
class node_process {
public:
  node_process(std::string name, std::vector<std::string> extra_args)
      : name_(std::move(name)), extra_args_(std::move(extra_args)) {}
  ~node_process() { kill_and_reap(); }
  node_process(const node_process&) = delete;
  node_process& operator=(const node_process&) = delete;

  // Starts the node on a free port and waits (bounded) until it listens; retries on another
  // port if the chosen one was taken meanwhile.
  void start() {
    for (int attempt = 0; attempt < 5; ++attempt) {
      port_ = free_ports(1)[0];
      spawn();
      if (wait_listening(30s))
        return;
      std::string text = log();
      kill_and_reap();
      INFO("node " << name_ << " log:\n" << text);
      REQUIRE((text.find("cannot listen") != std::string::npos || text.find("in use") != std::string::npos));
    }
    FAIL("node " << name_ << ": no free port after 5 attempts");
  }

  const std::string& name() const { return name_; }
  std::uint16_t port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  std::string log() const { return slurp(log_); }
  pid_t pid() const { return pid_; }

  bool running() {
    if (pid_ <= 0)
      return false;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      forget();
      return false;
    }
    return true;
  }
  void signal(int sig) {
    if (running())
      REQUIRE(::kill(pid_, sig) == 0);
  }
  // SIGKILL (after SIGCONT, in case it is stopped) and reap, bounded.
  void kill_and_reap() {
    if (pid_ <= 0)
      return;
    ::kill(pid_, SIGCONT);
    ::kill(pid_, SIGKILL);
    auto until = steady::now() + 10s;
    while (steady::now() < until) {
      int status = 0;
      pid_t got = ::waitpid(pid_, &status, WNOHANG);
      if (got == pid_ || got < 0)
        break;
      std::this_thread::sleep_for(5ms);
    }
    forget();
  }

private:
  void spawn() {
    static int counter = 0;
    log_ = scratch_dir() / (name_ + "_" + std::to_string(++counter) + ".log");
    std::vector<std::string> args{MOERT_BINARY, "node",          "--listen", address(), "--secret-file",
                                  secret_file(), "--name", name_};
    args.insert(args.end(), extra_args_.begin(), extra_args_.end());
    std::vector<char*> argv;
    for (auto& a : args)
      argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t parent = ::getpid();
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      // Should the test die without its destructors, the kernel kills the node.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent)
        ::_exit(126);
      int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::execv(MOERT_BINARY, argv.data());
      ::_exit(127);
    }
    std::lock_guard lock{children_mutex};
    children.insert(pid_);
  }

  bool wait_listening(std::chrono::milliseconds limit) {
    auto until = steady::now() + limit;
    while (steady::now() < until) {
      if (log().find("listening on") != std::string::npos)
        return true;
      if (!running())
        return false;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }

  void forget() {
    std::lock_guard lock{children_mutex};
    children.erase(pid_);
    pid_ = -1;
  }

  std::string name_;
  std::vector<std::string> extra_args_;
  std::uint16_t port_ = 0;
  fs::path log_;
  pid_t pid_ = -1;
};

// Nodes by name; the destructor kills every one of them, also when a REQUIRE throws.
class node_fleet {
public:
  explicit node_fleet(std::vector<std::string> extra_args = {}) : extra_args_(std::move(extra_args)) {}

  node_process& start(const std::string& name) {
    auto& slot = nodes_[name];
    slot = std::make_unique<node_process>(name, extra_args_);
    slot->start();
    return *slot;
  }
  node_process& operator[](const std::string& name) {
    auto it = nodes_.find(name);
    REQUIRE(it != nodes_.end());
    return *it->second;
  }
  // Restarts the nodes that died (a failed transport may take a node down): the next engine
  // then starts from a clean fleet. Returns the names of those restarted.
  std::vector<std::string> revive() {
    std::vector<std::string> restarted;
    for (auto& [name, node] : nodes_)
      if (!node->running()) {
        restarted.push_back(name + " (its log ends: " + tail(node->log(), 300) + ")");
        node->start();
      }
    return restarted;
  }
  std::string logs() const {
    std::string all;
    for (const auto& [name, node] : nodes_)
      all += "--- node " + name + " ---\n" + node->log();
    return all;
  }

private:
  std::vector<std::string> extra_args_;
  std::map<std::string, std::unique_ptr<node_process>> nodes_;
};

struct node_spec {
  std::string name;
  std::string address;
  std::size_t attention_devices = 0;
  std::size_t expert_devices = 0;
};

// Writes the cluster file and reads it back the way `moert --cluster` does.
cluster_config write_cluster(const std::string& file_name, const std::string& transport,
                             const std::vector<node_spec>& nodes, int heartbeat_ms = 0,
                             int liveness_timeout_ms = 0) {
  json root;
  root["transport"] = transport;
  if (heartbeat_ms > 0)
    root["heartbeat_ms"] = heartbeat_ms;
  if (liveness_timeout_ms > 0)
    root["liveness_timeout_ms"] = liveness_timeout_ms;
  root["nodes"] = json::array();
  for (const auto& n : nodes) {
    json node{{"name", n.name}, {"address", n.address}};
    if (n.attention_devices)
      node["attention_devices"] = n.attention_devices;
    if (n.expert_devices)
      node["expert_devices"] = n.expert_devices;
    root["nodes"].push_back(node);
  }
  fs::path path = scratch_dir() / file_name;
  write_file(path, root.dump(1), 0644);
  auto loaded = load_cluster_config(path.string());
  INFO(root.dump());
  REQUIRE(loaded.ok());
  return *loaded;
}

// One request's events, collected by the submit callback with their arrival times.
struct request_log {
  std::vector<std::int32_t> tokens;
  std::vector<std::vector<float>> logits;
  std::vector<float> prompt_logits;
  bool ended = false;
  FinishReason finish = FinishReason::none;
  std::string error;
  steady::time_point first_event{}, end_time{};
  std::size_t events = 0;
};

class collector {
public:
  explicit collector(std::size_t count) : logs_(count) {}

  std::function<void(const TokenEvent&)> sink(std::size_t i) {
    return [this, i](const TokenEvent& e) {
      std::lock_guard lock{mutex_};
      auto& log = logs_[i];
      auto now = steady::now();
      if (log.events++ == 0)
        log.first_event = now;
      if (e.token >= 0) {
        log.tokens.push_back(e.token);
        log.logits.push_back(e.logits);
      }
      if (!e.prompt_logits.empty())
        log.prompt_logits = e.prompt_logits;
      if (!e.error.empty() && first_error_ == steady::time_point{})
        first_error_ = now;
      if (e.last) {
        log.ended = true;
        log.finish = e.finish_reason;
        log.error = e.error;
        log.end_time = now;
      }
      changed_.notify_all();
    };
  }
  // Waits until every request ended or `limit` passed; true when all ended.
  bool wait_all(std::chrono::milliseconds limit) {
    std::unique_lock lock{mutex_};
    return changed_.wait_for(lock, limit, [&] {
      for (const auto& l : logs_)
        if (!l.ended)
          return false;
      return true;
    });
  }
  // Waits until at least `tokens` tokens arrived in total.
  bool wait_tokens(std::size_t tokens, std::chrono::milliseconds limit) {
    std::unique_lock lock{mutex_};
    return changed_.wait_for(lock, limit, [&] {
      std::size_t n = 0;
      for (const auto& l : logs_)
        n += l.tokens.size();
      return n >= tokens;
    });
  }
  std::vector<request_log> snapshot() const {
    std::lock_guard lock{mutex_};
    return logs_;
  }
  steady::time_point first_error() const {
    std::lock_guard lock{mutex_};
    return first_error_;
  }

private:
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<request_log> logs_;
  steady::time_point first_error_{};
};

// The fixture's prompts as requests: greedy and sampled alternately, every logit returned.
std::vector<Request> fixture_requests(const fs::path& dir, std::size_t max_new_tokens) {
  std::ifstream in{dir / "prompts.json"};
  auto prompts = json::parse(in).get<std::vector<std::vector<std::int32_t>>>();
  std::vector<Request> requests;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    Request r;
    r.id = i + 1;
    r.prompt = prompts[i];
    r.max_new_tokens = max_new_tokens;
    if (i % 2 == 1)
      r.sampling = {0.8f, 40, 0.95f, 77};
    r.return_logits = true;
    r.return_prompt_logits = true;
    r.ignore_eos = true;  // the same number of tokens from every run
    requests.push_back(std::move(r));
  }
  return requests;
}

struct run_result {
  std::string failure;  // empty when the engine came up and every request finished
  std::vector<request_log> logs;
};

// Builds an engine, runs `requests` concurrently, shuts it down; all bounded.
run_result run_engine(const EngineConfig& config, const std::vector<Request>& requests) {
  run_result out;
  std::unique_ptr<Engine> engine;
  std::string create_error;
  bounded("Engine::create", 120s, [&] {
    auto created = Engine::create(config);
    if (created.ok())
      engine = std::move(*created);
    else
      create_error = created.err().message;
  });
  if (!engine) {
    out.failure = "Engine::create failed: " + create_error;
    return out;
  }
  collector events{requests.size()};
  for (std::size_t i = 0; i < requests.size(); ++i)
    engine->submit(requests[i], events.sink(i));
  bool all_ended = events.wait_all(120s);
  out.logs = events.snapshot();
  if (!all_ended) {
    out.failure = "not every request ended within 120 s";
    for (const auto& r : requests)
      engine->cancel(r.id);
  }
  bounded("Engine::shutdown", 60s, [&] { engine->shutdown(); });
  bounded("~Engine", 60s, [&] { engine.reset(); });
  for (std::size_t i = 0; out.failure.empty() && i < out.logs.size(); ++i)
    if (!out.logs[i].error.empty() || out.logs[i].finish != FinishReason::length)
      out.failure = "request " + std::to_string(requests[i].id) + " ended with '" + out.logs[i].error +
                    "' (finish " + to_string(out.logs[i].finish) + ")";
  return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// "" when `got` matches `want` bit for bit, else where it first differs.
std::string compare_runs(const std::vector<request_log>& want, const std::vector<request_log>& got) {
  if (want.size() != got.size())
    return "request count differs";
  for (std::size_t i = 0; i < want.size(); ++i) {
    std::string req = "request " + std::to_string(i + 1) + ": ";
    if (got[i].tokens != want[i].tokens)
      return req + "tokens differ";
    if (want[i].prompt_logits.empty())
      return req + "the single-process run returned no prompt logits";
    if (!same_bits(got[i].prompt_logits, want[i].prompt_logits))
      return req + "prompt logits differ (" + std::to_string(got[i].prompt_logits.size()) + " vs " +
             std::to_string(want[i].prompt_logits.size()) + " floats)";
    if (got[i].logits.size() != want[i].logits.size())
      return req + "number of logit rows differs";
    for (std::size_t s = 0; s < want[i].logits.size(); ++s) {
      if (want[i].logits[s].empty())
        return req + "the single-process run returned no logits at token " + std::to_string(s);
      if (!same_bits(got[i].logits[s], want[i].logits[s]))
        return req + "logits of token " + std::to_string(s) + " differ";
    }
  }
  return {};
}

struct topology {
  const char* label;
  std::vector<node_spec> nodes;  // addresses filled in from the fleet
};

// Every fixture over 1+2 and 2+3 nodes and every transport, against one process with the
// same numbers of devices. A failing transport does not stop the others: each one's result
// is printed, then the test fails naming the transports that failed.
void check_fixture(const std::string& name) {
  auto dir = test::fixture_dir(name);
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  auto requests = fixture_requests(dir, 5);
  node_fleet fleet;
  for (const char* n : {"a0", "a1", "e0", "e1", "e2"})
    fleet.start(n);
  std::vector<topology> topologies{
      {"1 attention + 2 expert nodes", {{"a0", "", 1, 0}, {"e0", "", 0, 1}, {"e1", "", 0, 1}}},
      {"2 attention + 3 expert nodes",
       {{"a0", "", 1, 0}, {"a1", "", 1, 0}, {"e0", "", 0, 1}, {"e1", "", 0, 1}, {"e2", "", 0, 1}}},
  };
  std::vector<std::string> failures;
  for (auto& topo : topologies) {
    std::size_t ag = 0, eg = 0;
    for (const auto& n : topo.nodes) {
      ag += n.attention_devices;
      eg += n.expert_devices;
    }
    EngineConfig single;
    single.model_dir = dir.string();
    single.attention_devices = ag;
    single.expert_devices = eg;
    auto reference = run_engine(single, requests);
    INFO(name << ", single process --ag " << ag << " --eg " << eg);
    REQUIRE(reference.failure.empty());

    for (const char* transport : transports) {
      for (const auto& restarted : fleet.revive())
        std::printf("  (restarted dead node %s)\n", restarted.c_str());
      for (auto& n : topo.nodes)
        n.address = fleet[n.name].address();
      EngineConfig config;
      config.model_dir = dir.string();
      config.cluster = write_cluster(name + "-" + std::to_string(ag) + "-" + std::to_string(eg) + "-" + transport +
                                         ".json",
                                     transport, topo.nodes);
      config.cluster_secret = cluster_secret();
      auto t0 = steady::now();
      auto got = run_engine(config, requests);
      std::string failure = got.failure.empty() ? compare_runs(reference.logs, got.logs) : got.failure;
      std::printf("%s, %s, transport %s: %s (%.0f ms)\n", name.c_str(), topo.label, transport,
                  failure.empty() ? "tokens and logits bit-identical to one process" : ("FAILED: " + failure).c_str(),
                  ms_between(t0, steady::now()));
      std::fflush(stdout);
      if (!failure.empty())
        failures.push_back(std::string{"transport "} + transport + ", " + topo.label + ": " + failure);
    }
  }
  std::string all;
  for (const auto& f : failures)
    all += "\n  " + f;
  INFO(name << ": failed runs:" << all << "\nnode logs:\n" << fleet.logs());
  CHECK(failures.empty());
}

}  // namespace

TEST_CASE("qwen3_moe_tiny across node processes is bit-identical to one process", "[multiproc]") {
  check_fixture("qwen3_moe_tiny");
}

TEST_CASE("mixtral_tiny across node processes is bit-identical to one process", "[multiproc]") {
  check_fixture("mixtral_tiny");
}

TEST_CASE("deepseek_v2_tiny across node processes is bit-identical to one process", "[multiproc]") {
  check_fixture("deepseek_v2_tiny");
}

// -- liveness ----------------------------------------------------------------------------

namespace {

struct liveness_setup {
  int heartbeat_ms;
  int liveness_timeout_ms;
};

// A 1+2 cluster over caf generating several long requests; `strike` hits expert node e1
// once tokens flow. Every request must end with an error naming e1, within `bound`; returns
// the detection time (strike -> first error event) in ms.
double detection_after(const liveness_setup& setup, const std::function<void(node_process&)>& strike,
                       std::chrono::milliseconds bound) {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return 0;
  }
  node_fleet fleet{{"--heartbeat-ms", std::to_string(setup.heartbeat_ms), "--liveness-timeout-ms",
                    std::to_string(setup.liveness_timeout_ms)}};
  for (const char* n : {"a0", "e0", "e1"})
    fleet.start(n);
  EngineConfig config;
  config.model_dir = dir.string();
  config.cluster = write_cluster("liveness.json", "caf",
                                 {{"a0", fleet["a0"].address(), 1, 0},
                                  {"e0", fleet["e0"].address(), 0, 1},
                                  {"e1", fleet["e1"].address(), 0, 1}},
                                 setup.heartbeat_ms, setup.liveness_timeout_ms);
  config.cluster_secret = cluster_secret();
  std::unique_ptr<Engine> engine;
  std::string create_error;
  bounded("Engine::create", 60s, [&] {
    auto created = Engine::create(config);
    if (created.ok())
      engine = std::move(*created);
    else
      create_error = created.err().message;
  });
  INFO(create_error << "\n" << fleet.logs());
  REQUIRE(engine);

  // Long enough that no request can finish before the strike (the fixture allows 4096).
  const std::size_t count = 6;
  collector events{count};
  for (std::size_t i = 0; i < count; ++i) {
    Request r;
    r.id = 100 + i;
    r.prompt = {1 + std::int32_t(i), 17, 33, 2};
    r.max_new_tokens = 3000;
    r.ignore_eos = true;
    if (i % 2)
      r.sampling = {0.9f, 0, 1.0f, 3};
    engine->submit(r, events.sink(i));
  }
  REQUIRE(events.wait_tokens(2 * count, 60s));  // generation is under way
  auto struck = steady::now();
  strike(fleet["e1"]);
  bool all_ended = events.wait_all(bound + 5s);
  auto logs = events.snapshot();
  auto first_error = events.first_error();
  if (!all_ended)
    for (std::size_t i = 0; i < count; ++i)
      engine->cancel(100 + i);
  auto shutdown_start = steady::now();
  bounded("Engine::shutdown after a lost node", 30s, [&] { engine->shutdown(); });
  bounded("~Engine after a lost node", 30s, [&] { engine.reset(); });
  double shutdown_ms = ms_between(shutdown_start, steady::now());

  REQUIRE(all_ended);
  REQUIRE(first_error != steady::time_point{});
  double detection_ms = ms_between(struck, first_error);
  double last_end_ms = 0;
  for (std::size_t i = 0; i < count; ++i) {
    INFO("request " << 100 + i << ": " << logs[i].tokens.size() << " tokens, error '" << logs[i].error << "'");
    CHECK(logs[i].finish == FinishReason::error);
    CHECK(logs[i].error.find("node e1") != std::string::npos);
    CHECK(logs[i].tokens.size() < 3000);
    last_end_ms = std::max(last_end_ms, ms_between(struck, logs[i].end_time));
  }
  std::printf("  detection %.0f ms (strike -> first error), every request ended %.0f ms after the strike, "
              "shutdown %.0f ms; error: %s\n",
              detection_ms, last_end_ms, shutdown_ms, logs[0].error.c_str());
  std::fflush(stdout);
  CHECK(detection_ms < double(bound.count()));
  CHECK(last_end_ms < double(bound.count()));
  return detection_ms;
}

}  // namespace

TEST_CASE("SIGKILL of an expert node mid-generation ends every request with an error naming it",
          "[multiproc][liveness]") {
  std::printf("SIGKILL of expert node e1 (heartbeat 200 ms, liveness timeout 1500 ms):\n");
  detection_after({200, 1500}, [](node_process& node) { node.signal(SIGKILL); }, 5000ms);
}

TEST_CASE("SIGSTOP of an expert node is noticed within the liveness timeout", "[multiproc][liveness]") {
  std::printf("SIGSTOP of expert node e1 (heartbeat 100 ms, liveness timeout 1000 ms):\n");
  // The bound: the timeout, one heartbeat for CAF to look, and slack for a loaded machine.
  detection_after({100, 1000}, [](node_process& node) { node.signal(SIGSTOP); }, 2500ms);
  // The fleet's destructor sends SIGCONT, then SIGKILL.
}

TEST_CASE("a cluster whose node is not running fails Engine::create naming the node", "[multiproc][liveness]") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  node_fleet fleet;
  fleet.start("a0");
  fleet.start("e0");
  auto vacant = free_ports(1)[0];  // nobody listens there
  EngineConfig config;
  config.model_dir = dir.string();
  config.cluster = write_cluster("missing-node.json", "caf",
                                 {{"a0", fleet["a0"].address(), 1, 0},
                                  {"e0", fleet["e0"].address(), 0, 1},
                                  {"e1", "127.0.0.1:" + std::to_string(vacant), 0, 1}});
  config.cluster_secret = cluster_secret();
  config.cluster_timeout = 2000ms;
  std::string error;
  bool created = false;
  auto t0 = steady::now();
  bounded("Engine::create with a missing node", 30s, [&] {
    auto engine = Engine::create(config);
    created = engine.ok();
    if (!created)
      error = engine.err().message;
  });
  double ms = ms_between(t0, steady::now());
  std::printf("missing node e1: Engine::create failed after %.0f ms: %s\n", ms, error.c_str());
  REQUIRE_FALSE(created);
  CHECK(error.find("node e1") != std::string::npos);
  CHECK(ms < 2000 + 3000);

  // A node that accepts the connection and then never answers (stopped): bring-up gives up
  // after cluster_timeout and names it.
  auto e1 = &fleet.start("e1");
  e1->signal(SIGSTOP);
  config.cluster = write_cluster("stopped-node.json", "caf",
                                 {{"a0", fleet["a0"].address(), 1, 0},
                                  {"e0", fleet["e0"].address(), 0, 1},
                                  {"e1", e1->address(), 0, 1}});
  error.clear();
  t0 = steady::now();
  bounded("Engine::create with a stopped node", 30s, [&] {
    auto engine = Engine::create(config);
    created = engine.ok();
    if (!created)
      error = engine.err().message;
  });
  ms = ms_between(t0, steady::now());
  std::printf("stopped node e1: Engine::create failed after %.0f ms (cluster_timeout 2000 ms): %s\n", ms,
              error.c_str());
  REQUIRE_FALSE(created);
  CHECK(error.find("node e1") != std::string::npos);
  CHECK(ms < 2000 + 3000);
  e1->kill_and_reap();

  // The nodes that were asked stay usable: a complete cluster on them works.
  e1 = &fleet.start("e1");
  config.cluster = write_cluster("missing-node-fixed.json", "caf",
                                 {{"a0", fleet["a0"].address(), 1, 0},
                                  {"e0", fleet["e0"].address(), 0, 1},
                                  {"e1", e1->address(), 0, 1}});
  config.cluster_timeout = 30000ms;
  auto run = run_engine(config, fixture_requests(dir, 3));
  INFO(run.failure << "\n" << fleet.logs());
  CHECK(run.failure.empty());
}

TEST_CASE("a wrong secret is refused with an error naming the node, without a hang", "[multiproc][liveness]") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  node_fleet fleet;
  for (const char* n : {"a0", "e0", "e1"})
    fleet.start(n);
  EngineConfig config;
  config.model_dir = dir.string();
  config.cluster = write_cluster("wrong-secret.json", "caf",
                                 {{"a0", fleet["a0"].address(), 1, 0},
                                  {"e0", fleet["e0"].address(), 0, 1},
                                  {"e1", fleet["e1"].address(), 0, 1}});
  config.cluster_secret = "not-the-cluster-secret";
  config.cluster_timeout = 3000ms;
  std::string error;
  bool created = false;
  auto t0 = steady::now();
  bounded("Engine::create with a wrong secret", 30s, [&] {
    auto engine = Engine::create(config);
    created = engine.ok();
    if (!created)
      error = engine.err().message;
  });
  double ms = ms_between(t0, steady::now());
  std::printf("wrong secret: Engine::create failed after %.0f ms: %s\n", ms, error.c_str());
  REQUIRE_FALSE(created);
  CHECK(error.find("node a0") != std::string::npos);
  CHECK(ms < 3000 + 5000);

  // The nodes keep serving peers that hold the secret.
  for (const char* n : {"a0", "e0", "e1"})
    CHECK(fleet[n].running());
  config.cluster_secret = cluster_secret();
  config.cluster_timeout = 30000ms;
  auto run = run_engine(config, fixture_requests(dir, 3));
  INFO(run.failure << "\n" << fleet.logs());
  CHECK(run.failure.empty());
}

// -- node to node ----------------------------------------------------------------------

TEST_CASE("A2E and E2A go node to node: this process's gates carry control only", "[multiproc]") {
  auto dir = test::fixture_dir("qwen3_moe_tiny");
  if (dir.empty()) {
    test::skip_whole_binary("../shared/fixtures not found");
    return;
  }
  node_fleet fleet;
  for (const char* n : {"a0", "e0", "e1"})
    fleet.start(n);
  EngineConfig config;
  config.model_dir = dir.string();
  // Transport caf: the rows travel inside the CAF messages, so rows routed through this
  // process would show in its gates' byte counts.
  config.cluster = write_cluster("node-to-node.json", "caf",
                                 {{"a0", fleet["a0"].address(), 1, 0},
                                  {"e0", fleet["e0"].address(), 0, 1},
                                  {"e1", fleet["e1"].address(), 0, 1}});
  config.cluster_secret = cluster_secret();
  auto requests = fixture_requests(dir, 8);
  std::size_t tokens = 0;
  for (auto& r : requests) {
    r.return_logits = false;  // logits come to this process by design: keep them out of the count
    r.return_prompt_logits = false;
    tokens += r.prompt.size() + r.max_new_tokens;
  }
  std::unique_ptr<Engine> engine;
  std::string create_error;
  bounded("Engine::create", 120s, [&] {
    auto created = Engine::create(config);
    if (created.ok())
      engine = std::move(*created);
    else
      create_error = created.err().message;
  });
  INFO(create_error << "\n" << fleet.logs());
  REQUIRE(engine);
  std::uint64_t before = 0;  // bring-up: the handles and the plan
  bounded("Engine::report", 30s, [&] { before = engine->report().cluster_caf_bytes; });
  collector events{requests.size()};
  for (std::size_t i = 0; i < requests.size(); ++i)
    engine->submit(requests[i], events.sink(i));
  bool all_ended = events.wait_all(120s);
  // report() on a thread of its own, as ~Engine runs on one of bounded()'s: a CAF 0.17
  // scoped_actor leaves the actor system's logger in its thread's thread-local storage, and
  // ~actor_system waits for the logger's last reference, so an engine destroyed on another
  // thread than the one that called report() hangs (its caller's thread still holds it).
  EngineReport report;
  bounded("Engine::report", 30s, [&] { report = engine->report(); });
  bounded("Engine::shutdown", 60s, [&] { engine->shutdown(); });
  bounded("~Engine", 60s, [&] { engine.reset(); });
  REQUIRE(all_ended);
  for (const auto& log : events.snapshot())
    REQUIRE(log.error.empty());

  // Every token crosses A2E and E2A on each layer with top_k rows of hidden floats.
  auto cfg = json::parse(slurp(dir / "config.json"));
  double row_bytes = double(tokens) * cfg["num_hidden_layers"].get<double>() *
                     cfg["num_experts_per_tok"].get<double>() * cfg["hidden_size"].get<double>() * 4 * 2;
  double through_gates = double(report.cluster_caf_bytes - before);
  std::printf("node to node: %.0f bytes through this process's gates for %zu tokens (%.0f B/token); the rows are "
              "%.0f bytes (%.0f B/token)\n",
              through_gates, tokens, through_gates / double(tokens), row_bytes, row_bytes / double(tokens));
  // Routed through this process, the rows would pass two of its gates (in from a0, out to
  // e0/e1): at least twice row_bytes.
  CHECK(through_gates < row_bytes / 2);
}
