#include "engine/engine.hpp"

#include "actors/attention_shard.hpp"
#include "actors/census.hpp"
#include "actors/device.hpp"
#include "actors/expert.hpp"
#include "actors/ingress.hpp"
#include "actors/mu_queue.hpp"
#include "actors/policy_actor.hpp"
#include "actors/runtime.hpp"
#include "actors/node_supervisor.hpp"
#include "actors/supervisor.hpp"
#include "engine/cluster.hpp"
#include "model/weights.hpp"
#include "policy/placement.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
#include <array>
#include <atomic>
#include <map>
#include <set>
#include <thread>

#include <sched.h>

namespace moert {

// -- names ---------------------------------------------------------------------------

const char* to_string(FinishReason reason) {
  switch (reason) {
    case FinishReason::none: return "none";
    case FinishReason::length: return "length";
    case FinishReason::stop: return "stop";
    case FinishReason::cancelled: return "cancelled";
    case FinishReason::error: return "error";
  }
  return "unknown";
}

const char* to_string(ErrorCode code) {
  switch (code) {
    case ErrorCode::none: return "none";
    case ErrorCode::invalid_request: return "invalid_request";
    case ErrorCode::context_too_long: return "context_too_long";
    case ErrorCode::overloaded: return "overloaded";
    case ErrorCode::shutdown: return "shutdown";
    case ErrorCode::internal: return "internal";
    case ErrorCode::deadline_exceeded: return "deadline_exceeded";
  }
  return "unknown";
}

// The actors' enums are the public ones, value for value.
static_assert(int(FinishReason::error) == int(actors::finish_reason::error));
static_assert(int(ErrorCode::internal) == int(actors::request_error::internal));
static_assert(int(ErrorCode::deadline_exceeded) == int(actors::request_error::deadline_exceeded));

// -- TokenStream ------------------------------------------------------------------

void TokenStream::push(TokenEvent event) {
  {
    std::lock_guard<std::mutex> guard{mutex_};
    if (ended_)
      return;
    if (event.token >= 0)
      tokens_.push_back(event.token);
    if (event.error_code != ErrorCode::none)
      error_ = event.error;
    if (event.last) {
      ended_ = true;
      finish_ = event.finish_reason;
      error_code_ = event.error_code;
    }
    events_.push_back(std::move(event));
  }
  changed_.notify_all();
}

std::optional<TokenEvent> TokenStream::next() {
  std::unique_lock<std::mutex> lock{mutex_};
  changed_.wait(lock, [this] { return !events_.empty() || ended_; });
  if (events_.empty())
    return std::nullopt;
  TokenEvent event = std::move(events_.front());
  events_.pop_front();
  return event;
}

result<std::vector<std::int32_t>> TokenStream::wait() {
  std::unique_lock<std::mutex> lock{mutex_};
  changed_.wait(lock, [this] { return ended_; });
  if (error_code_ != ErrorCode::none)
    return make_error(error_code::invalid_argument, error_);
  if (finish_ == FinishReason::cancelled)
    return make_error(error_code::invalid_argument, "cancelled");
  return tokens_;
}

bool TokenStream::done() const {
  std::lock_guard<std::mutex> guard{mutex_};
  return ended_;
}

FinishReason TokenStream::finish_reason() const {
  std::lock_guard<std::mutex> guard{mutex_};
  return finish_;
}

ErrorCode TokenStream::error_code() const {
  std::lock_guard<std::mutex> guard{mutex_};
  return error_code_;
}

// -- Engine -------------------------------------------------------------------------

struct Engine::impl {
  EngineConfig config;
  actors::runtime_stats stats;
  // The fault injector, made with or without a fault plan (at-least-once retransmission
  // always runs); the actors and devices below point at it.
  std::unique_ptr<transport::fault_injector> faults;
  actors::trace_recorder trace;
  actors::runtime_context ctx;
  // The actors this engine spawned (weakly), to name any that outlive shutdown.
  actors::actor_census census;
  std::size_t actors_running_after_shutdown = 0, actors_alive_after_shutdown = 0;
  // Devices outlive the actors that post to them: declared before the actor system.
  std::vector<std::unique_ptr<actors::device>> devices;
  std::string expert_gemm_switch;  // EngineReport::expert_gemm_switch
  caf::actor_system_config system_config;
  std::unique_ptr<caf::actor_system> system;
  caf::actor ingress;
  caf::actor supervisor;  // one process only: re-creates dead shards, queues and experts
  std::vector<caf::actor> all_actors;
  // Cluster mode: the gates to the nodes (they relay CAF's connections) and the node
  // supervisor that re-places a lost node's part (actors/node_supervisor.hpp). Empty in one
  // process.
  std::optional<cluster_session> cluster;
  caf::actor node_supervisor;
  std::shared_ptr<actors::cluster_health> cluster_health = std::make_shared<actors::cluster_health>();

  mutable std::mutex mutex;  // guards the members below, and `ingress` once created
  std::condition_variable idle;
  std::set<std::uint64_t> live_ids;  // submitted and not yet ended
  std::set<std::uint64_t> cancelled_ids;  // live ids whose cancel is on its way: sent once
  std::uint64_t next_id = 1;
  bool accepting = true;
  bool stopped = false;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  // How requests ended, by FinishReason (index).
  std::array<std::atomic<std::uint64_t>, 5> finished{};
  std::string placement_reason;  // from the testbed (resolve_placement), or empty
};

namespace {

// CAF 0.17 keeps a reference to the actor system's logger in a thread-local of every thread
// that spawns an actor or makes a scoped_actor (logger::set_current_actor_system), and
// ~actor_system waits for the logger's last reference. A caller's thread that stays alive
// after such a call would hang ~Engine on any other thread, so every public call that spawns
// or makes a scoped_actor on its caller's thread drops that reference before it returns
// (tests/engine/caller_threads). Declared before the scoped_actor, so it runs after it.
class caller_thread_release {
 public:
  explicit caller_thread_release(caf::actor_system& system) : system_(system) {}
  caller_thread_release(const caller_thread_release&) = delete;
  caller_thread_release& operator=(const caller_thread_release&) = delete;
  ~caller_thread_release() {
    if (caf::logger::current_logger() == &system_.logger())
      caf::logger::set_current_actor_system(nullptr);
  }

 private:
  caf::actor_system& system_;
};

using clock = std::chrono::steady_clock;

double ms_between(clock::time_point from, clock::time_point to) {
  return std::max(0.0, std::chrono::duration<double, std::milli>(to - from).count());
}

// What the sink remembers of one request to time it.
struct request_clock {
  clock::time_point submitted;
  clock::time_point first_token{};
  clock::time_point last_token{};
  std::size_t tokens = 0;

  void saw(const actors::token_event& e, clock::time_point now) {
    if (e.token < 0)
      return;
    if (tokens++ == 0)
      first_token = now;
    last_token = now;
  }

  RequestTimings timings(clock::time_point admitted, clock::time_point now) const {
    RequestTimings t;
    t.total_ms = ms_between(submitted, now);
    // Never admitted (refused, or cancelled while queued): it waited its whole life.
    t.queue_wait_ms = admitted == clock::time_point{} ? t.total_ms : std::min(ms_between(submitted, admitted), t.total_ms);
    t.time_to_first_token_ms = tokens ? ms_between(submitted, first_token) : 0.0;
    t.mean_time_between_tokens_ms = tokens >= 2 ? ms_between(first_token, last_token) / double(tokens - 1) : 0.0;
    return t;
  }
};

TokenEvent to_public(actors::token_event&& e) {
  TokenEvent out;
  out.request_id = e.request_id;
  out.token = e.token;
  out.index = e.index;
  out.last = e.last;
  out.finish_reason = FinishReason(int(e.finish));
  out.error_code = ErrorCode(int(e.error_code));
  out.error = std::move(e.error);
  out.logprob = e.logprob;
  out.top_logprobs.reserve(e.top_logprobs.size());
  for (auto [token, logprob] : e.top_logprobs)
    out.top_logprobs.push_back({token, logprob});
  out.logits = std::move(e.logits);
  out.prompt_logits = std::move(e.prompt_logits);
  return out;
}

}  // namespace


Engine::Engine(std::unique_ptr<impl> state) : impl_(std::move(state)) {}

Engine::~Engine() {
  shutdown();
}

result<std::unique_ptr<Engine>> Engine::create(EngineConfig config) {
  auto invalid = [](const std::string& message) { return make_error(error_code::invalid_argument, message); };
  if (config.attention_devices == 0 || config.expert_devices == 0 || config.threads_per_device == 0)
    return invalid("attention_devices, expert_devices and threads_per_device must be at least 1");
  if (config.plan.r1 == 0 || config.plan.r2 == 0)
    return invalid("plan: r1 and r2 must be at least 1");
  // Before anything is loaded: a backend that cannot run here fails at once, naming why.
  if (auto usable = actors::check_backend(config.backend); !usable.ok())
    return usable.err();
  // Off the cpu backend every device loads its own part of the weights onto its backend, so
  // weights already in host memory cannot be used. A cluster's devices live on its nodes, and
  // each node picks their backend.
  bool per_device = config.per_device_weights || config.backend != gpu::backend_kind::cpu;
  if (config.backend != gpu::backend_kind::cpu && config.cluster)
    return make_error(error_code::unsupported,
                      std::string("backend '") + gpu::to_string(config.backend) +
                          "' with a cluster: the nodes pick their backend (moert node --backend, or \"backend\" per "
                          "node in the cluster file); this process holds no device (use --backend cpu here)");
  if (per_device && config.weights)
    return invalid(std::string("EngineConfig::weights are host weights shared by every device; with backend '") +
                   gpu::to_string(config.backend) +
                   "' (or per_device_weights) each device loads its own part: give model_dir or synthetic_config");

  if (config.cluster) {
    if (config.weights)
      return invalid("a cluster's nodes load the model themselves: give model_dir or synthetic_config, not weights");
    if (config.single_device)
      return invalid("single_device runs in one process: it cannot be combined with a cluster");
    if (auto files = check_tls_files(config.tls); !files.ok())
      return files.err();
    config.attention_devices = config.cluster->attention_devices();
    config.expert_devices = config.cluster->expert_devices();
  }

  auto state = std::make_unique<impl>();
  model::model_weights weights;
  if (config.cluster) {
    // This process holds no layer: the model's shape is all it needs.
    auto parsed = !config.model_dir.empty() ? model::load_config(config.model_dir)
                                            : model::parse_config(config.synthetic_config, "synthetic model config");
    if (!parsed)
      return parsed.err();
    state->ctx.config = *parsed;
  } else if (config.weights) {
    state->ctx.config = config.weights_config;
  } else if (!config.model_dir.empty() && per_device) {
    auto parsed = model::load_config(config.model_dir);  // the devices load their parts below
    if (!parsed)
      return parsed.err();
    state->ctx.config = *parsed;
  } else if (!config.model_dir.empty()) {
    auto loaded = model::load_checkpoint(config.model_dir);
    if (!loaded)
      return loaded.err();
    state->ctx.config = std::move(loaded->config);
    weights = std::move(loaded->weights);
    for (const auto& name : weights.unexpected_tensors)
      spdlog::warn("{}: tensor '{}' is not used by {}", config.model_dir, name, to_string(state->ctx.config.arch));
  } else {
    if (config.synthetic_config.empty())
      return invalid("EngineConfig needs model_dir or synthetic_config");
    auto parsed = model::parse_config(config.synthetic_config, "synthetic model config");
    if (!parsed)
      return parsed.err();
    state->ctx.config = *parsed;
    if (!per_device)
      weights = model::synthetic_weights(*parsed, config.weight_seed);
  }
  auto placed = resolve_placement(config, state->ctx.config);
  if (!placed)
    return placed.err();
  state->placement_reason = std::move(*placed);
  if (config.expert_devices > std::size_t(state->ctx.config.num_experts))
    return invalid("expert_devices (" + std::to_string(config.expert_devices) + ") exceeds the number of experts (" +
                   std::to_string(state->ctx.config.num_experts) + ")");
  if (!config.cluster && !per_device)
    state->ctx.weights =
        config.weights ? config.weights : std::make_shared<const model::model_weights>(std::move(weights));
  state->ctx.num_expert_devices = config.expert_devices;
  state->ctx.prefill_chunk_tokens = config.prefill_chunk_tokens;
  state->ctx.backend = config.backend;
  state->ctx.stats = &state->stats;
  state->ctx.trace = config.trace ? &state->trace : nullptr;
  if (config.faults) {
    // Node faults name nodes of the cluster file: checked before any node is asked.
    for (std::size_t i = 0; i < config.faults->nodes.size(); ++i) {
      const std::string& name = config.faults->nodes[i].node;
      std::string key = "fault plan: 'nodes[" + std::to_string(i) + "].node' ";
      if (!config.cluster)
        return invalid(key + "'" + name + "': node faults need a cluster (--cluster FILE)");
      std::string names;
      bool known = false;
      for (const auto& node : config.cluster->nodes) {
        known = known || node.name == name;
        names += (names.empty() ? "" : ", ") + node.name;
      }
      if (!known)
        return invalid(key + "'" + name + "' is not a node of the cluster (its nodes: " + names + ")");
    }
  }
  // Without a plan too: A2E/E2A delivery is always at least once, with generous timeouts
  // (transport::without_faults), so a message lost anyway costs time, not a request.
  state->faults = std::make_unique<transport::fault_injector>(config.faults ? *config.faults
                                                                            : transport::without_faults());
  state->ctx.faults = state->faults.get();
  state->ctx.census = &state->census;

  state->system_config.set("scheduler.max-threads", config.actor_threads);
  // Device threads post completions from outside CAF's workers. Under work stealing such a
  // message lands in one worker's queue, and an idle worker polls it only every 10 ms
  // (relaxed-sleep-duration): measured, 2-3 ms of idle device between every attention and
  // expert task of a decode step. The sharing policy's workers wait on a condition variable
  // that the enqueue signals; its few µs more per local message do not count here.
  state->system_config.set("scheduler.policy", caf::atom("sharing"));
  state->system_config.set("logger.verbosity", caf::atom("quiet"));
  if (config.cluster)
    configure_for_cluster(state->system_config, config.cluster->heartbeat, config.cluster->liveness_timeout,
                          config.tls);
  state->system = std::make_unique<caf::actor_system>(state->system_config);
  caf::actor_system& sys = *state->system;
  caller_thread_release release_thread{sys};
  const actors::runtime_context* ctx = &state->ctx;

  // Per-device weights: each device's part, loaded onto its own backend (one backend, one
  // stream, per device). The checkpoint is opened once and read per device.
  std::optional<model::checkpoint> source;
  if (per_device && !config.cluster && !config.model_dir.empty()) {
    auto opened = model::checkpoint::open(config.model_dir);
    if (!opened)
      return opened.err();
    source.emplace(std::move(*opened));
  }
  std::size_t next_device_index = 0;
  // The grouped/dense expert GEMM switch a cuda device starts with: the calibrated crossover
  // (moert calibrate --backend cuda writes it into the testbed), else the backend's default.
  gpu::gemm_calibration gemm_calibration = actors::gemm_calibration_from(
      config.expert_gemm      ? config.expert_gemm
      : config.online_testbed ? config.online_testbed->expert_gemm
                              : std::nullopt);
  if (config.backend == gpu::backend_kind::cuda)
    state->expert_gemm_switch =
        !gemm_calibration.calibrated
            ? "the cuda backend's default (EPS-MoE's threshold), not calibrated: run `moert calibrate --backend cuda` "
              "and pass its testbed"
        : gemm_calibration.dense_min_rows
            ? "dense from " + std::to_string(*gemm_calibration.dense_min_rows) + " rows (calibrated: " +
                  gemm_calibration.source + ")"
            : "every expert grouped: dense never won (calibrated: " + gemm_calibration.source + ")";  // attention and expert devices numbered together
  auto build_device = [&](const std::string& name, const model::load_options& part) -> result<actors::device*> {
    std::size_t index = next_device_index++;
    if (!per_device)
      return state->devices.emplace_back(std::make_unique<actors::device>(name, config.threads_per_device, ctx->trace))
          .get();
    auto dev = actors::make_device_with_weights(name, config.backend, index, config.threads_per_device,
                                                gemm_calibration, state->ctx.config, source ? &*source : nullptr,
                                                config.weight_seed, part, ctx->trace);
    if (!dev)
      return dev.err();
    return state->devices.emplace_back(std::move(*dev)).get();
  };
  auto make_device = [&](const std::string& name, const model::load_options& part) -> result<actors::device*> {
    if (config.single_device && !state->devices.empty())
      return state->devices.front().get();
    model::load_options whole;  // a single device runs every role
    return build_device(config.single_device ? "device 0" : name, config.single_device ? whole : part);
  };
  auto expert_part = [&](std::size_t d) {
    model::load_options part;
    part.attention_side = false;
    std::size_t eg = config.expert_devices;
    part.keep_expert = [d, eg](std::size_t expert) { return expert % eg == d; };  // runtime_context::device_of
    return part;
  };
  auto attention_part = [] {
    model::load_options part;
    part.keep_expert = [](std::size_t) { return false; };
    return part;
  };
  // Every device exists (and holds its weights) before any actor is spawned, so a device that
  // cannot be made or loaded fails Engine::create with no actor left running.
  std::vector<actors::device*> made_expert_devs, made_attention_devs;
  for (std::size_t d = 0; !config.cluster && d < config.expert_devices; ++d) {
    auto dev = make_device("expert " + std::to_string(d), expert_part(d));
    if (!dev)
      return dev.err();
    made_expert_devs.push_back(*dev);
  }
  for (std::size_t a = 0; !config.cluster && a < config.attention_devices; ++a) {
    auto dev = make_device("attention " + std::to_string(a), attention_part());
    if (!dev)
      return dev.err();
    made_attention_devs.push_back(*dev);
  }
  // The shards, μ-queues and experts handle their device's completions on its thread: each hop
  // of a decode step through CAF's scheduler woke a sleeping worker (actors/device.hpp).
  for (auto& dev : state->devices)
    dev->set_actors_inline(true);
  actors::scheduler_update scheduler{config.scheduler, config.defrag};
  std::vector<caf::actor> queues;
  std::vector<caf::actor> shards;
  std::vector<caf::actor> experts;
  std::vector<actors::device*> expert_devs, attention_devs;
  if (config.cluster) {
    state->ingress = sys.spawn<actors::ingress>(config.kv_capacity_tokens, &state->stats, config.max_queued_tokens);
    state->census.add(state->ingress, "ingress");
    state->all_actors.push_back(state->ingress);
    cluster_request ask;
    ask.model = {config.model_dir, config.synthetic_config, config.weight_seed};
    ask.threads_per_device = std::uint32_t(config.threads_per_device);
    ask.scheduler = scheduler;
    ask.plan = {config.plan};
    ask.ingress = state->ingress;
    ask.timeout = config.cluster_timeout;
    ask.faults = config.faults ? &*config.faults : nullptr;
    auto session = connect_cluster(sys, *config.cluster, config.cluster_secret, ask, config.tls.enabled());
    if (!session.ok()) {
      caf::anon_send_exit(state->ingress, caf::exit_reason::user_shutdown);
      return session.err();
    }
    queues = session->queues;
    shards = session->shards;
    state->cluster = std::move(*session);
  }
  // One actor per routed expert, on the device the placement names (round-robin to start).
  // Experts move only where every device reads the shared host weights: a device with weights
  // of its own holds only its experts' (moving one there would need loading it, not built).
  if (!config.cluster) {
    if (!per_device)
      state->ctx.placement = std::make_shared<actors::expert_placement>(std::size_t(state->ctx.config.num_experts),
                                                                        config.expert_devices);
    experts.resize(std::size_t(state->ctx.config.num_experts));
  }
  for (std::size_t d = 0; !config.cluster && d < config.expert_devices; ++d) {
    actors::device* dev = made_expert_devs[d];
    state->ctx.expert_devices.push_back(dev);
    std::map<std::uint32_t, caf::actor> hosted;
    for (std::uint32_t e : ctx->hosted_by(d)) {
      experts[e] = sys.spawn<actors::expert>(ctx, e);
      state->census.add(experts[e], "expert " + std::to_string(e));
      hosted[e] = experts[e];
    }
    caf::actor queue = sys.spawn<actors::mu_queue>(ctx, d, scheduler, dev->name(), std::move(hosted));
    state->census.add(queue, "mu_queue " + std::to_string(d));
    queues.push_back(queue);
    state->all_actors.push_back(queue);
    expert_devs.push_back(dev);
  }
  state->all_actors.insert(state->all_actors.end(), experts.begin(), experts.end());
  for (const auto& queue : config.cluster ? std::vector<caf::actor>{} : queues)  // rows of moved experts
    caf::anon_send(queue, actors::peers_atom::value, queues);
  if (!config.cluster) {
    state->ingress = sys.spawn<actors::ingress>(config.kv_capacity_tokens, &state->stats, config.max_queued_tokens);
    state->census.add(state->ingress, "ingress");
    state->all_actors.push_back(state->ingress);
  }
  for (std::size_t a = 0; !config.cluster && a < config.attention_devices; ++a) {
    actors::device* dev = made_attention_devs[a];
    attention_devs.push_back(dev);
    shards.push_back(sys.spawn<actors::attention_shard>(ctx, std::uint32_t(a), dev, queues, state->ingress,
                                                        config.plan));
    state->census.add(shards.back(), "attention shard " + std::to_string(a));
  }
  if (!config.cluster)  // a node stops its own actors when this engine goes
    state->all_actors.insert(state->all_actors.end(), shards.begin(), shards.end());
  // The plan's slow devices ("expert:1" is the device named "expert 1").
  for (auto& dev : state->devices) {
    auto space = dev->name().find(' ');
    if (!state->faults || space == std::string::npos)
      continue;
    double factor = state->faults->slowdown(dev->name().substr(0, space), std::stoul(dev->name().substr(space + 1)));
    if (factor > 1.0)
      dev->set_slowdown(factor);
  }
  std::optional<actors::online_problem> online;
  if (config.online_testbed)
    online = actors::online_problem{shape_of(state->ctx.config), *config.online_testbed, config.attention_devices,
                                    config.expert_devices, config.replan};
  caf::actor policy = sys.spawn<actors::policy_actor>(ctx, shards, queues, config.plan, scheduler, std::move(online));
  state->census.add(policy, "policy");
  state->all_actors.push_back(policy);
  for (const auto& shard : shards)
    caf::anon_send(shard, actors::policy_atom::value, policy);
  caf::anon_send(state->ingress, shards);
  if (config.cluster) {
    actors::cluster_placement placement;
    for (std::size_t i = 0; i < config.cluster->nodes.size(); ++i) {
      const cluster_node& node = config.cluster->nodes[i];
      placement.nodes.push_back({state->cluster->nodes[i], node.name, node.attention_devices > 0,
                                 node.expert_devices > 0, {}});
    }
    placement.queues = queues;
    placement.shards = shards;
    for (std::size_t d = 0; d < queues.size(); ++d)
      placement.queue_node.push_back(config.cluster->node_of_expert_device(d));
    for (std::size_t a = 0; a < shards.size(); ++a)
      placement.shard_node.push_back(config.cluster->node_of_shard(a));
    placement.ingress = state->ingress;
    placement.policy = policy;
    placement.model = {config.model_dir, config.synthetic_config, config.weight_seed};
    placement.threads_per_device = std::uint32_t(config.threads_per_device);
    placement.scheduler = scheduler;
    placement.plan = {config.plan};
    placement.adopt_timeout = config.cluster_timeout;
    placement.max_restarts = config.max_restarts;
    placement.restart_period = config.restart_period;
    state->node_supervisor = sys.spawn<actors::node_supervisor>(std::move(placement), state->cluster_health);
    state->census.add(state->node_supervisor, "node supervisor");
    state->all_actors.push_back(state->node_supervisor);
  }
  if (!config.cluster) {  // a cluster's nodes are watched by the cluster watch instead
    actors::supervised_set children{shards, queues, experts, attention_devs, expert_devs,
                                    state->ingress, policy, config.plan, scheduler};
    state->supervisor = sys.spawn<actors::supervisor>(
        ctx, std::move(children), actors::supervision_params{config.max_restarts, config.restart_period});
    state->census.add(state->supervisor, "supervisor");
    state->all_actors.push_back(state->supervisor);
  }
  state->config = std::move(config);
  state->started = std::chrono::steady_clock::now();
  return std::unique_ptr<Engine>(new Engine(std::move(state)));
}

std::shared_ptr<TokenStream> Engine::submit(Request request, std::function<void(const TokenEvent&)> on_token) {
  auto stream = std::make_shared<TokenStream>();
  clock::time_point submitted = clock::now();
  const model::model_config& c = impl_->ctx.config;
  auto refuse = [&](ErrorCode code, const std::string& why) {
    TokenEvent event;
    event.request_id = request.id;
    event.last = true;
    event.finish_reason = FinishReason::error;
    event.error_code = code;
    event.error = why;
    event.timings.queue_wait_ms = event.timings.total_ms = ms_between(submitted, clock::now());
    ++impl_->finished[std::size_t(FinishReason::error)];
    if (on_token)
      on_token(event);
    stream->push(std::move(event));
    return stream;
  };
  if (request.prompt.empty())
    return refuse(ErrorCode::invalid_request, "empty prompt");
  for (std::size_t i = 0; i < request.prompt.size(); ++i)
    if (request.prompt[i] < 0 || request.prompt[i] >= c.vocab_size)
      return refuse(ErrorCode::invalid_request, "token id " + std::to_string(request.prompt[i]) + " at position " +
                                                    std::to_string(i) + " is outside the vocabulary [0, " +
                                                    std::to_string(c.vocab_size) + ")");
  if (request.max_new_tokens == 0)
    return refuse(ErrorCode::invalid_request, "max_new_tokens must be at least 1");
  if (request.top_logprobs > 20)
    return refuse(ErrorCode::invalid_request,
                  "top_logprobs " + std::to_string(request.top_logprobs) + " is outside 0..20");
  // Overflow-safe: max_new_tokens may be anything a caller typed (SIZE_MAX included).
  std::size_t context = max_context_tokens();
  if (request.prompt.size() > context)
    return refuse(ErrorCode::context_too_long, "prompt of " + std::to_string(request.prompt.size()) +
                                                   " tokens exceeds the model's context of " +
                                                   std::to_string(context) + " tokens (max_position_embeddings)");
  if (request.max_new_tokens > context - request.prompt.size())
    return refuse(ErrorCode::context_too_long,
                  "prompt of " + std::to_string(request.prompt.size()) + " tokens + max_new_tokens " +
                      std::to_string(request.max_new_tokens) + " exceed the model's context of " +
                      std::to_string(context) + " tokens (max_position_embeddings)");
  // Decided under the lock, answered outside it: `on_token` may submit again.
  std::optional<std::pair<ErrorCode, std::string>> refusal;
  {
    std::lock_guard<std::mutex> guard{impl_->mutex};
    std::size_t limit = impl_->config.max_inflight_requests;
    if (!impl_->accepting) {
      refusal.emplace(ErrorCode::shutdown, "the engine is shut down");
    } else if (limit > 0 && impl_->live_ids.size() >= limit) {
      refusal.emplace(ErrorCode::overloaded, "overloaded: " + std::to_string(impl_->live_ids.size()) +
                                                 " requests in flight, the limit is " + std::to_string(limit));
    } else if (request.id != 0 && impl_->live_ids.count(request.id)) {
      refusal.emplace(ErrorCode::invalid_request, "request id " + std::to_string(request.id) + " is already in use");
    } else {
      if (request.id == 0) {
        while (impl_->live_ids.count(impl_->next_id))
          ++impl_->next_id;
        request.id = impl_->next_id++;
      }
      impl_->live_ids.insert(request.id);
    }
  }
  if (refusal)
    return refuse(refusal->first, refusal->second);
  actors::admit_request admit;
  admit.request_id = request.id;
  admit.prompt = std::move(request.prompt);
  admit.max_new_tokens = request.max_new_tokens;
  admit.sampling = request.sampling;
  admit.return_logits = request.return_logits;
  admit.return_prompt_logits = request.return_prompt_logits;
  admit.stop_token_ids = std::move(request.stop_token_ids);
  if (!request.ignore_eos)
    admit.stop_token_ids.insert(admit.stop_token_ids.end(), c.eos_token_ids.begin(), c.eos_token_ids.end());
  std::sort(admit.stop_token_ids.begin(), admit.stop_token_ids.end());
  admit.stop_token_ids.erase(std::unique(admit.stop_token_ids.begin(), admit.stop_token_ids.end()),
                             admit.stop_token_ids.end());
  admit.logprobs = request.logprobs;
  admit.top_logprobs = request.top_logprobs;
  if (request.deadline.count() > 0)
    admit.deadline = submitted + request.deadline;
  impl* state = impl_.get();
  std::uint64_t id = request.id;
  // Events come one at a time per request (token_sink), so the clock needs no lock.
  admit.sink = std::make_shared<actors::token_sink>(
      [stream, on_token = std::move(on_token), state, id, timer = request_clock{submitted}](
          actors::token_event event) mutable {
        clock::time_point now = clock::now();
        timer.saw(event, now);
        bool last = event.last;
        clock::time_point admitted = event.admitted;
        TokenEvent out = to_public(std::move(event));
        if (last) {
          out.timings = timer.timings(admitted, now);
          ++state->finished[std::size_t(out.finish_reason)];
          // The id is free before anybody can hear that the request ended.
          std::lock_guard<std::mutex> guard{state->mutex};
          state->live_ids.erase(id);
          state->cancelled_ids.erase(id);
          state->idle.notify_all();
        }
        if (on_token)
          on_token(out);
        stream->push(std::move(out));
      });
  caf::actor ingress;
  {
    std::lock_guard<std::mutex> guard{impl_->mutex};
    ingress = impl_->ingress;
  }
  caf::anon_send(ingress, std::move(admit));
  return stream;
}

void Engine::cancel(std::uint64_t request_id) {
  caf::actor ingress;
  {
    std::lock_guard<std::mutex> guard{impl_->mutex};
    // Only a live request's first cancel is sent: a client repeating cancel (or cancelling
    // ids that ended) must not flood the ingress's mailbox.
    if (!impl_->live_ids.count(request_id) || !impl_->cancelled_ids.insert(request_id).second)
      return;
    ingress = impl_->ingress;  // null once shut down
  }
  if (ingress)
    caf::anon_send(ingress, actors::cancel_atom::value, request_id);
}

void Engine::shutdown() {
  {
    std::unique_lock<std::mutex> lock{impl_->mutex};
    if (impl_->stopped)
      return;
    impl_->accepting = false;
    caf::anon_send(impl_->ingress, actors::drain_atom::value);
    impl_->idle.wait(lock, [this] { return impl_->live_ids.empty(); });
    impl_->stopped = true;
  }
  if (impl_->cluster) {
    // Wait (bounded) until each node has torn down this engine's part, so the next engine
    // finds the nodes free. Nobody waits on a lost node: should it come back, it frees itself
    // when it sees this engine go.
    caller_thread_release release_thread{*impl_->system};
    caf::scoped_actor self{*impl_->system};
    for (std::size_t i = 0; i < impl_->cluster->nodes.size(); ++i)
      if (!impl_->cluster_health->node_lost(i))
        self->request(impl_->cluster->nodes[i], std::chrono::seconds{5}, actors::release_atom::value)
            .receive([](caf::atom_value) {}, [](caf::error&) {});
  }
  for (auto& actor : impl_->all_actors)
    caf::anon_send_exit(actor, caf::exit_reason::user_shutdown);
  impl_->all_actors.clear();
  {
    std::lock_guard<std::mutex> guard{impl_->mutex};
    impl_->ingress = nullptr;
  }
  // Bounded: an actor nobody stopped is named in the log and counted in the report (the
  // chaos suite asserts 0 per seed), then killed, instead of hanging here for good.
  caf::actor_system& sys = *impl_->system;
  auto wait_until = [](auto done, std::chrono::milliseconds limit) {
    auto deadline = clock::now() + limit;
    while (!done() && clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::microseconds{200});
    return done();
  };
  if (!wait_until([&] { return sys.registry().running() == 0; }, std::chrono::seconds{10})) {
    impl_->actors_running_after_shutdown = sys.registry().running();
    std::string names;
    for (const auto& name : impl_->census.running())
      names += (names.empty() ? "" : ", ") + name;
    spdlog::error("engine shutdown: {} actors still running 10 s after every actor was told to stop: {}; killed",
                  impl_->actors_running_after_shutdown, names.empty() ? "none of the engine's own" : names);
    impl_->census.kill_running();
  }
  sys.await_all_actors_done();
  // Tasks a dead actor left on a device hold that actor: they finish while the actor system
  // they send to still exists.
  for (auto& dev : impl_->devices)
    if (!dev->drain(std::chrono::seconds{60}))
      spdlog::error("{}: tasks still running 60 s after shutdown", dev->name());
  // Every actor has exited; what still holds one now is a leak (a handle kept somewhere, a
  // cycle), except the engine's own handles and the clock's pending delayed messages (a
  // retransmission timer holds its shard), which are dropped first.
  {
    std::lock_guard<std::mutex> guard{impl_->mutex};
    impl_->supervisor = nullptr;
    impl_->node_supervisor = nullptr;
  }
  sys.clock().cancel_all();
  if (!wait_until([&] { return impl_->census.alive().empty(); }, std::chrono::seconds{2})) {
    auto alive = impl_->census.alive();
    impl_->actors_alive_after_shutdown = alive.size();
    std::string names;
    for (const auto& name : alive)
      names += (names.empty() ? "" : ", ") + name;
    spdlog::error("engine shutdown: {} exited actors are still held 2 s after shutdown (leaked): {}", alive.size(),
                  names);
  }
}

status Engine::move_expert(std::size_t expert_id, std::size_t device) {
  caf::actor supervisor;
  {
    std::lock_guard<std::mutex> guard{impl_->mutex};
    if (impl_->stopped || !impl_->supervisor)
      return make_error(error_code::invalid_argument,
                        "move_expert: experts move in one process only (cluster), and not after shutdown");
    supervisor = impl_->supervisor;
  }
  std::string why = "move_expert: the supervisor did not answer within 5 s";
  caf::scoped_actor self{*impl_->system};
  self->request(supervisor, std::chrono::seconds{5}, actors::move_atom::value, std::uint32_t(expert_id),
                std::uint32_t(device))
      .receive([&](const std::string& answer) { why = answer; }, [](caf::error&) {});
  if (!why.empty())
    return make_error(error_code::invalid_argument, why);
  return status::success();
}

std::vector<std::size_t> Engine::expert_placement() const {
  std::vector<std::size_t> out;
  for (std::size_t e = 0; e < std::size_t(impl_->ctx.config.num_experts); ++e)
    out.push_back(impl_->ctx.device_of(e));
  return out;
}

status Engine::kill_actor(const std::string& kind, std::size_t device) {
  caf::actor supervisor;
  {
    std::lock_guard<std::mutex> guard{impl_->mutex};
    if (impl_->stopped || !impl_->supervisor)
      return make_error(error_code::invalid_argument, "kill_actor: no supervised actors (cluster, or shut down)");
    supervisor = impl_->supervisor;
  }
  bool killed = false;
  caller_thread_release release_thread{*impl_->system};
  caf::scoped_actor self{*impl_->system};
  self->request(supervisor, std::chrono::seconds{5}, actors::kill_atom::value, kind, std::uint32_t(device))
      .receive([&](bool ok) { killed = ok; }, [](caf::error&) {});
  if (!killed)
    return make_error(error_code::invalid_argument,
                      "kill_actor: no " + kind + " actor " + std::to_string(device) +
                          " (kinds: expert <expert id>, expert_device <device>, queue <device>, attention <device>), "
                          "or supervision gave up");
  return status::success();
}

policy::model_shape Engine::shape_of(const model::model_config& c) {
  policy::model_shape s;
  s.name = std::string{to_string(c.arch)};
  s.num_layers = std::size_t(c.num_layers);
  for (bool sparse : c.sparse_layers)
    s.num_dense_layers += !sparse;
  s.dense_intermediate = std::size_t(c.intermediate_size);
  s.hidden = std::size_t(c.hidden_size);
  s.num_experts = std::size_t(c.num_experts);
  s.top_k = std::size_t(c.num_experts_per_tok);
  s.expert_intermediate = std::size_t(c.moe_intermediate_size);
  s.num_shared = c.shared_expert_intermediate_size > 0 ? 1 : 0;  // DeepSeek's are fused into one
  s.shared_intermediate = std::size_t(c.shared_expert_intermediate_size);
  if (c.mla()) {
    s.attention = policy::attention_kind::mla;
    s.mla = {std::size_t(c.num_heads),        std::size_t(c.q_lora_rank),      std::size_t(c.kv_lora_rank),
             std::size_t(c.qk_nope_head_dim), std::size_t(c.qk_rope_head_dim), std::size_t(c.v_head_dim)};
  } else {
    s.attention = policy::attention_kind::gqa;
    s.gqa = {std::size_t(c.num_heads), std::size_t(c.num_kv_heads), std::size_t(c.head_dim)};
  }
  s.vocab = std::size_t(c.vocab_size);
  s.dtype_bytes = 4;  // compute and KV cache are f32
  return s;
}

result<std::string> Engine::resolve_placement(EngineConfig& config, const model::model_config& model) {
  if (!config.placement_testbed || config.cluster)
    return std::string{};
  // The cores this process may run on (taskset, cgroup cpusets), not the machine's.
  std::size_t cores = config.placement_cores;
  cpu_set_t allowed;
  if (cores == 0 && sched_getaffinity(0, sizeof allowed, &allowed) == 0)
    cores = std::size_t(CPU_COUNT(&allowed));
  if (cores == 0)
    cores = std::max<std::size_t>(1, std::thread::hardware_concurrency());
  auto choice = policy::choose_placement(shape_of(model), *config.placement_testbed, cores);
  if (!choice)
    return choice.err();
  const policy::placement_candidate& c = choice->chosen;
  config.single_device = c.colocated;
  config.attention_devices = c.ag;
  config.expert_devices = std::min(c.eg, std::size_t(std::max<std::int64_t>(1, model.num_experts)));
  config.threads_per_device = c.threads_per_device;
  if (!c.colocated)
    config.plan = c.plan;
  return choice->reason;
}

std::string Engine::placement() const {
  const EngineConfig& c = impl_->config;
  std::string text = c.single_device
                         ? "1 device (attention and experts), " + std::to_string(c.threads_per_device) + " threads"
                         : std::to_string(c.attention_devices) + " attention + " + std::to_string(c.expert_devices) +
                               " expert devices, " + std::to_string(c.threads_per_device) + " threads each";
  return impl_->placement_reason.empty() ? text : text + "; " + impl_->placement_reason;
}

const model::model_config& Engine::model_config() const {
  return impl_->ctx.config;
}

std::size_t Engine::vocab_size() const {
  return std::size_t(impl_->ctx.config.vocab_size);
}

std::size_t Engine::max_context_tokens() const {
  return std::size_t(impl_->ctx.config.max_position_embeddings);
}

std::vector<std::int32_t> Engine::eos_token_ids() const {
  return impl_->ctx.config.eos_token_ids;
}

EngineLoad Engine::load() const {
  std::size_t live;
  {
    std::lock_guard<std::mutex> guard{impl_->mutex};
    live = impl_->live_ids.size();
  }
  // Submitted but not yet pinned (also on the way to the ingress) counts as waiting.
  std::size_t running = std::min(impl_->stats.running(), live);
  return {running, live - running};
}

EngineReport Engine::report() const {
  EngineReport out;
  double lifetime = std::chrono::duration<double>(std::chrono::steady_clock::now() - impl_->started).count();
  for (const auto& dev : impl_->devices)
    out.devices.push_back({dev->name(), std::chrono::duration<double>(dev->busy_time()).count() / lifetime,
                           dev->backend().name(), dev->weights() ? model::resident_bytes(*dev->weights()).total() : 0});
  out.expert_gemm_switch = impl_->expert_gemm_switch;
  auto batches = impl_->stats.expert_batches();
  out.expert_batch_mean = batches.mean;
  out.expert_batch_p50 = batches.p50;
  out.expert_batch_p95 = batches.p95;
  out.executions_per_layer_wave = impl_->stats.executions_per_layer_wave();
  out.tokens = impl_->stats.tokens();
  out.replans = impl_->stats.replans();
  out.last_solve_micros = impl_->stats.last_solve_micros();
  out.messages_per_token = out.tokens ? double(impl_->stats.messages()) / double(out.tokens) : 0.0;
  out.messages = impl_->stats.messages();
  out.control_messages = impl_->stats.control_messages();
  out.retransmit_timers = impl_->stats.retransmit_timers();
  for (const auto& dev : impl_->devices)
    out.device_actor_activations += dev->inline_resumes();
  out.expert_batches = batches.count;
  out.forwarded_rows = impl_->stats.forwarded_rows();
  out.finished_length = impl_->finished[std::size_t(FinishReason::length)];
  out.finished_stop = impl_->finished[std::size_t(FinishReason::stop)];
  out.cancelled = impl_->finished[std::size_t(FinishReason::cancelled)];
  out.actors_spawned = impl_->census.recorded();
  using mailbox = actors::runtime_stats::mailbox_kind;
  out.mailbox_peak_ingress = impl_->stats.mailbox_peak(mailbox::ingress);
  out.mailbox_peak_shard = impl_->stats.mailbox_peak(mailbox::shard);
  out.mailbox_peak_queue = impl_->stats.mailbox_peak(mailbox::queue);
  out.mailbox_peak_expert = impl_->stats.mailbox_peak(mailbox::expert);
  {
    std::lock_guard<std::mutex> guard{impl_->mutex};
    out.actors_running_after_shutdown = impl_->actors_running_after_shutdown;
    out.actors_alive_after_shutdown = impl_->actors_alive_after_shutdown;
  }
  // Always: without a plan the counts say what at-least-once delivery did (retransmissions).
  out.faults = impl_->faults->counts();
  if (impl_->config.faults) {
    out.faults_enabled = true;
    for (const auto& dev : impl_->devices)
      out.faults.slowed_tasks += dev->stretched_tasks();
    if (impl_->cluster) {
      // Each surviving node's injector (a lost node's counts are lost with it), and the nodes
      // the plan's node faults took down.
      caf::scoped_actor self{*impl_->system};
      for (std::size_t i = 0; i < impl_->cluster->nodes.size(); ++i) {
        if (impl_->cluster_health->node_lost(i))
          continue;
        self->request(impl_->cluster->nodes[i], std::chrono::seconds{2}, caf::get_atom::value, actors::fault_atom::value)
            .receive(
                [&](const transport::fault_counts& c) {
                  std::uint64_t node_faults = out.faults.node_faults;  // counted here, below
                  out.faults += c;
                  out.faults.node_faults = node_faults;
                },
                [](caf::error&) {});
      }
      for (const auto& fault : impl_->config.faults->nodes)
        for (std::size_t i = 0; i < impl_->cluster->nodes.size(); ++i)
          if (impl_->config.cluster->nodes[i].name == fault.node && impl_->cluster_health->node_lost(i))
            ++out.faults.node_faults;
    }
  }
  out.errors = impl_->finished[std::size_t(FinishReason::error)];
  caf::actor supervisor;
  {
    std::lock_guard<std::mutex> guard{impl_->mutex};
    if (!impl_->stopped)
      supervisor = impl_->supervisor;
  }
  caller_thread_release release_thread{*impl_->system};
  if (supervisor) {
    caf::scoped_actor self{*impl_->system};
    self->request(supervisor, std::chrono::seconds{2}, caf::get_atom::value)
        .receive(
            [&](std::uint64_t restarts, bool escalated, double last_us) {
              out.restarts = restarts;
              out.supervision_escalated = escalated;
              out.last_restart_ms = last_us / 1000.0;
            },
            [](caf::error&) {});
  }
  if (impl_->cluster) {
    out.cluster_caf_bytes = impl_->cluster->caf_bytes();
    caf::scoped_actor self{*impl_->system};
    for (std::size_t i = 0; i < impl_->cluster->nodes.size(); ++i) {
      if (impl_->cluster_health->node_lost(i))
        continue;
      self->request(impl_->cluster->nodes[i], std::chrono::seconds{2}, caf::get_atom::value)
          .receive(
              [&](const std::string& shipped) {
                std::uint64_t bytes = 0, messages = 0, e2a = 0;
                if (std::sscanf(shipped.c_str(), "%lu %lu %lu", &bytes, &messages, &e2a) == 3) {
                  out.cluster_ucx_bytes += bytes;
                  out.cluster_ucx_messages += messages;
                  out.cluster_ucx_e2a_messages += e2a;
                }
              },
              [](caf::error&) {});
    }
    std::lock_guard<std::mutex> guard{impl_->cluster_health->mutex};
    for (std::size_t i = 0; i < impl_->cluster_health->lost.size(); ++i)
      if (impl_->cluster_health->lost[i])
        out.lost_nodes.push_back(impl_->config.cluster->nodes[i].name);
    out.cluster_recovery_failed = impl_->cluster_health->failed;
    for (const auto& r : impl_->cluster_health->recoveries)
      out.node_recoveries.push_back({r.node, r.what, r.noticed, r.recovery_ms});
  }
  return out;
}

std::string Engine::trace_json() const {
  return impl_->config.trace ? impl_->trace.to_json() : std::string{};
}

}  // namespace moert
