#include "actors/node_host.hpp"

#include "actors/attention_shard.hpp"
#include "actors/expert.hpp"
#include "actors/mu_queue.hpp"
#include "model/safetensors.hpp"
#include "model/weights.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <csignal>
#include <ctime>

#include <sys/wait.h>
#include <unistd.h>

namespace moert::actors {

void register_node_message_types(caf::actor_system_config& config) {
  register_message_types(config);
  config.add_message_type<model_source>("moert::model_source");
  config.add_message_type<host_experts>("moert::host_experts");
  config.add_message_type<host_shards>("moert::host_shards");
  config.add_message_type<transport::fault_counts>("moert::fault_counts");
}

node_host::node_host(caf::actor_config& cfg, std::string name, peer_connector connector, gpu::backend_kind backend,
                     gpu::gemm_calibration expert_gemm)
    : caf::event_based_actor(cfg),
      name_(std::move(name)),
      default_backend_(backend),
      expert_gemm_(std::move(expert_gemm)),
      connector_(std::move(connector)) {}

result<gpu::backend_kind> node_host::backend_for(const model_source& source) const {
  if (source.backend.empty())
    return ctx_ ? ctx_->backend : default_backend_;  // an adoption runs what the node runs
  if (auto kind = gpu::parse_backend_kind(source.backend))
    return *kind;
  return make_error(error_code::invalid_argument,
                    "node " + name_ + ": backend \"" + source.backend + "\" is not one of \"cpu\", \"cuda\"");
}

node_host::~node_host() {
  teardown();
}

void node_host::on_exit() {
  teardown();
}

std::string node_host::ensure_model(const model_source& source, std::uint32_t total_expert_devices,
                                    const caf::actor& owner, const transport::fault_plan* faults) {
  if (owner_ && owner != owner_)
    return "node " + name_ + " already serves another engine";
  std::string key = source.model_dir + '\n' + source.synthetic_config + '\n' + std::to_string(source.weight_seed) +
                    '\n' + std::to_string(total_expert_devices) + '\n' + std::to_string(source.attention_side) +
                    '\n' + std::to_string(source.first_expert_device) + '\n' + std::to_string(source.num_expert_devices) +
                    '\n' + source.backend;
  if (ctx_) {
    if (key != loaded_key_)
      return "node " + name_ + ": one engine asked for two different models or placements";
    return {};
  }
  stats_ = std::make_unique<runtime_stats>();
  std::unique_ptr<runtime_context> ctx;
  if (auto failure = load_context(source, total_expert_devices, ctx); !failure.empty()) {
    stats_.reset();
    return failure;
  }
  // Without a plan too: A2E/E2A delivery is always at least once (transport::without_faults).
  faults_ = std::make_unique<transport::fault_injector>(faults ? *faults : transport::without_faults());
  faults_->watch_node(name_);
  ctx->faults = faults_.get();
  ctx_ = std::move(ctx);
  loaded_key_ = std::move(key);
  owner_ = owner;
  monitor(owner_);
  return {};
}

std::string node_host::load_context(const model_source& source, std::uint32_t total_expert_devices,
                                    std::unique_ptr<runtime_context>& out) {
  auto ctx = std::make_unique<runtime_context>();
  auto kind = backend_for(source);
  if (!kind)
    return kind.err().message;
  // Before anything is loaded: a backend that cannot run here (no GPU) fails at once.
  if (auto usable = check_backend(*kind); !usable.ok())
    return "node " + name_ + ": " + usable.err().message;
  ctx->backend = *kind;
  if (*kind != gpu::backend_kind::cpu) {
    // Each device loads its own part onto its backend (make_device): only the shape here.
    auto parsed = !source.model_dir.empty() ? model::load_config(source.model_dir)
                                            : model::parse_config(source.synthetic_config, "synthetic model config");
    if (!parsed)
      return "node " + name_ + ": " + parsed.err().what();
    ctx->config = *parsed;
  } else if (!source.model_dir.empty()) {
    // Only this node's part: its experts (expert e lives on device e mod eg), and the
    // attention side when it hosts shards.
    model::load_options part;
    part.attention_side = source.attention_side;
    std::uint32_t first = source.first_expert_device, count = source.num_expert_devices;
    part.keep_expert = [first, count, total_expert_devices](std::size_t expert) {
      auto device = std::uint32_t(expert % std::max<std::uint32_t>(total_expert_devices, 1));
      return device >= first && device < first + count;
    };
    auto loaded = model::load_checkpoint(source.model_dir, part);
    if (!loaded)
      return "node " + name_ + ": " + loaded.err().what();
    ctx->config = std::move(loaded->config);
    ctx->weights = std::make_shared<const model::model_weights>(std::move(loaded->weights));
  } else {
    auto parsed = model::parse_config(source.synthetic_config, "synthetic model config");
    if (!parsed)
      return "node " + name_ + ": " + parsed.err().what();
    ctx->config = *parsed;
    ctx->weights = std::make_shared<const model::model_weights>(model::synthetic_weights(*parsed, source.weight_seed));
  }
  if (total_expert_devices == 0 || total_expert_devices > std::uint32_t(ctx->config.num_experts))
    return "node " + name_ + ": " + std::to_string(total_expert_devices) + " expert devices for " +
           std::to_string(ctx->config.num_experts) + " experts";
  ctx->num_expert_devices = total_expert_devices;
  ctx->stats = stats_.get();
  ctx->link = link_.get();
  out = std::move(ctx);
  return {};
}

std::string node_host::check_adopter(const caf::actor& owner) const {
  if (!ctx_ || !owner_)
    return "node " + name_ + " serves no engine: it cannot adopt a lost node's part";
  if (owner != owner_)
    return "node " + name_ + " already serves another engine";
  return {};
}

result<std::unique_ptr<device>> node_host::make_device(const runtime_context* ctx, const model_source& source,
                                                       const std::string& name, const model::load_options& part,
                                                       std::uint32_t threads,
                                                       std::optional<model::checkpoint>& checkpoint) {
  if (ctx->backend == gpu::backend_kind::cpu) {
    auto dev = std::make_unique<device>(name, threads, nullptr);
    // As in the engine: the shards, μ-queues and experts handle their device's completions on
    // its thread, instead of waking a CAF worker for every hop (actors/device.hpp). The devices
    // are destroyed by teardown() on this actor's thread, never on their own.
    dev->set_actors_inline(true);
    return dev;
  }
  if (!source.model_dir.empty() && !checkpoint) {
    auto opened = model::checkpoint::open(source.model_dir);
    if (!opened)
      return make_error(opened.err().code, "node " + name_ + ": " + opened.err().message);
    checkpoint.emplace(std::move(*opened));
  }
  // Numbered through the node's devices: on cuda, GPU (index mod the GPUs visible).
  auto made = make_device_with_weights(name, ctx->backend, devices_.size(), threads, expert_gemm_, ctx->config,
                                       checkpoint ? &*checkpoint : nullptr, source.weight_seed, part, nullptr);
  if (!made)
    return make_error(made.err().code, "node " + name_ + ": " + made.err().message);
  spdlog::info("node {}: {} on {}, holding its own {} bytes of weights", name_, name, (*made)->backend().name(),
               (*made)->weights() ? model::resident_bytes(*(*made)->weights()).total() : 0);
  (*made)->set_actors_inline(true);
  return std::move(*made);
}

result<std::vector<caf::actor>> node_host::spawn_experts(runtime_context* ctx, const host_experts& ask) {
  std::vector<std::unique_ptr<device>> made;
  std::optional<model::checkpoint> checkpoint;  // opened once for all the devices
  for (std::uint32_t d = ask.first_device; d < ask.first_device + ask.num_devices; ++d) {
    model::load_options part;
    part.attention_side = false;
    std::uint32_t total = ask.total_expert_devices;
    part.keep_expert = [d, total](std::size_t expert) { return expert % total == d; };  // runtime_context::device_of
    auto dev = make_device(ctx, ask.model, name_ + ": expert " + std::to_string(d), part, ask.threads_per_device,
                           checkpoint);
    if (!dev)
      return dev.err();
    made.push_back(std::move(*dev));
  }
  std::vector<caf::actor> queues;
  if (ctx->expert_devices.size() < ask.total_expert_devices)
    ctx->expert_devices.resize(ask.total_expert_devices, nullptr);
  for (std::uint32_t d = ask.first_device; d < ask.first_device + ask.num_devices; ++d) {
    auto& dev = devices_.emplace_back(std::move(made[d - ask.first_device]));
    if (ctx->faults && ctx->faults->slowdown("expert", d) > 1.0)
      dev->set_slowdown(ctx->faults->slowdown("expert", d));
    ctx->expert_devices[d] = dev.get();
    std::map<std::uint32_t, caf::actor> experts;  // one actor per routed expert of the device
    for (std::uint32_t e : ctx->hosted_by(d)) {
      experts[e] = system().spawn<expert>(ctx, e);
      hosted_.push_back(experts[e]);
    }
    std::vector<caf::actor> workers;
    for (const auto& [e, worker] : experts)
      workers.push_back(worker);
    caf::actor queue = system().spawn<mu_queue>(ctx, d, ask.scheduler, dev->name(), std::move(experts));
    hosted_.push_back(queue);
    // An expert that dies takes its μ-queue (and the device's other experts) along: the
    // engine's node supervisor sees the device go and re-places it (its rows replayed), as it
    // does for a lost node.
    for (const auto& worker : workers) {
      expert_queue_.emplace(worker.address(), queue);
      monitor(worker);
    }
    queues.push_back(queue);
  }
  return queues;
}

result<std::vector<caf::actor>> node_host::spawn_shards(const runtime_context* ctx, const host_shards& ask) {
  std::vector<std::unique_ptr<device>> made;
  std::optional<model::checkpoint> checkpoint;  // opened once for all the devices
  for (std::uint32_t a = ask.first_shard; a < ask.first_shard + ask.num_shards; ++a) {
    model::load_options part;
    part.keep_expert = [](std::size_t) { return false; };  // the attention side: no routed expert
    auto dev = make_device(ctx, ask.model, name_ + ": attention " + std::to_string(a), part, ask.threads_per_device,
                           checkpoint);
    if (!dev)
      return dev.err();
    made.push_back(std::move(*dev));
  }
  std::vector<caf::actor> shards;
  for (std::uint32_t a = ask.first_shard; a < ask.first_shard + ask.num_shards; ++a) {
    auto& dev = devices_.emplace_back(std::move(made[a - ask.first_shard]));
    if (ctx->faults && ctx->faults->slowdown("attention", a) > 1.0)
      dev->set_slowdown(ctx->faults->slowdown("attention", a));
    caf::actor shard = system().spawn<attention_shard>(ctx, a, dev.get(), ask.queues, ask.owner, ask.plan.plan);
    hosted_.push_back(shard);
    shards.push_back(shard);
  }
  return shards;
}

// Stops what this node hosts for its engine. Order matters: the actors stop first (so no one
// posts to a device any more), the devices then finish their queued tasks, and only then are
// the actors' objects released (those tasks still point into them).
void node_host::teardown() {
  for (const auto& actor : hosted_)
    caf::anon_send_exit(actor, caf::exit_reason::user_shutdown);
  for (const auto& actor : hosted_) {
    caf::scoped_actor waiter{system()};
    waiter->monitor(actor);
    waiter->receive([](const caf::down_msg&) {}, caf::after(std::chrono::seconds{5}) >> [] {});
  }
  devices_.clear();
  hosted_.clear();
  expert_queue_.clear();
  link_.reset();  // after the devices: their last tasks may still ship rows
  peers_.clear();  // after the actors that sent through them
  if (owner_)
    demonitor(owner_);
  owner_ = nullptr;
  adopted_ctx_.clear();
  ctx_.reset();
  faults_.reset();  // after every actor and device that points at it
  stats_.reset();
  loaded_key_.clear();
}

caf::behavior node_host::make_behavior() {
  set_down_handler([this](const caf::down_msg& down) {
    if (owner_ && down.source == owner_.address())
      return teardown();
    auto it = expert_queue_.find(down.source);
    if (it == expert_queue_.end())
      return;
    caf::actor queue = it->second;
    expert_queue_.erase(it);
    if (down.reason == caf::exit_reason::user_shutdown || down.reason == caf::exit_reason::normal)
      return;
    send_exit(queue, down.reason);
    for (auto other = expert_queue_.begin(); other != expert_queue_.end();)
      if (other->second == queue) {
        if (auto worker = caf::actor_cast<caf::actor>(other->first))
          send_exit(worker, down.reason);
        other = expert_queue_.erase(other);
      } else {
        ++other;
      }
  });
  return {
    [this](host_atom, host_experts& ask) -> caf::result<std::vector<caf::actor>> {
      if (auto failure = ensure_model(ask.model, ask.total_expert_devices, ask.owner,
                                      ask.with_faults ? &ask.faults : nullptr);
          !failure.empty())
        return caf::make_error(caf::sec::runtime_error, failure);
      if (ask.num_devices == 0 || ask.first_device + ask.num_devices > ask.total_expert_devices)
        return caf::make_error(caf::sec::runtime_error, "node " + name_ + ": expert devices out of range");
      auto queues = spawn_experts(ctx_.get(), ask);
      if (!queues)
        return caf::make_error(caf::sec::runtime_error, queues.err().message);
      return std::move(*queues);
    },
    [this](host_atom, host_shards& ask) -> caf::result<std::vector<caf::actor>> {
      if (auto failure = ensure_model(ask.model, ask.total_expert_devices, ask.owner,
                                      ask.with_faults ? &ask.faults : nullptr);
          !failure.empty())
        return caf::make_error(caf::sec::runtime_error, failure);
      if (ask.num_shards == 0 || ask.queues.size() != ask.total_expert_devices)
        return caf::make_error(caf::sec::runtime_error, "node " + name_ + ": shards need every expert queue");
      auto shards = spawn_shards(ctx_.get(), ask);
      if (!shards)
        return caf::make_error(caf::sec::runtime_error, shards.err().message);
      return std::move(*shards);
    },
    // Recovery: one more part, which a lost node held, with weights of its own.
    [this](adopt_atom, host_experts& ask) -> caf::result<std::vector<caf::actor>> {
      if (auto failure = check_adopter(ask.owner); !failure.empty())
        return caf::make_error(caf::sec::runtime_error, failure);
      if (ask.num_devices == 0 || ask.first_device + ask.num_devices > ask.total_expert_devices)
        return caf::make_error(caf::sec::runtime_error, "node " + name_ + ": expert devices out of range");
      std::unique_ptr<runtime_context> ctx;
      if (auto failure = load_context(ask.model, ask.total_expert_devices, ctx); !failure.empty())
        return caf::make_error(caf::sec::runtime_error, failure);
      ctx->faults = ctx_->faults;
      if (faults_)
        for (std::uint32_t d = ask.first_device; d < ask.first_device + ask.num_devices; ++d)
          for (auto actor : {transport::fault_actor::expert, transport::fault_actor::queue})
            faults_->disarm_kills(actor, d);
      auto queues = spawn_experts(ctx.get(), ask);
      if (!queues)
        return caf::make_error(caf::sec::runtime_error, queues.err().message);
      adopted_ctx_.push_back(std::move(ctx));
      return std::move(*queues);
    },
    [this](adopt_atom, host_shards& ask) -> caf::result<std::vector<caf::actor>> {
      if (auto failure = check_adopter(ask.owner); !failure.empty())
        return caf::make_error(caf::sec::runtime_error, failure);
      if (ask.num_shards == 0 || ask.queues.size() != ask.total_expert_devices)
        return caf::make_error(caf::sec::runtime_error, "node " + name_ + ": shards need every expert queue");
      std::unique_ptr<runtime_context> ctx;
      if (auto failure = load_context(ask.model, ask.total_expert_devices, ctx); !failure.empty())
        return caf::make_error(caf::sec::runtime_error, failure);
      ctx->faults = ctx_->faults;
      if (faults_)
        for (std::uint32_t a = ask.first_shard; a < ask.first_shard + ask.num_shards; ++a)
          faults_->disarm_kills(transport::fault_actor::attention, a);
      auto shards = spawn_shards(ctx.get(), ask);
      if (!shards)
        return caf::make_error(caf::sec::runtime_error, shards.err().message);
      adopted_ctx_.push_back(std::move(ctx));
      return std::move(*shards);
    },
    // Connect to another node so that messages to its actors go node to node.
    [this](peer_atom, const std::string& host, std::uint16_t port, const std::string& peer_name,
           std::uint32_t timeout_ms) -> caf::result<caf::atom_value> {
      if (!connector_)
        return caf::make_error(caf::sec::runtime_error, "node " + name_ + ": cannot connect to other nodes");
      std::string key = host + ":" + std::to_string(port);
      if (peers_.count(key))
        return caf::atom("ok");
      auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds{timeout_ms};
      auto connected = connector_(host, port, deadline);
      if (!connected.ok())
        return caf::make_error(caf::sec::runtime_error,
                               "node " + name_ + " cannot reach node " + peer_name + ": " + connected.err().message);
      peers_.emplace(key, std::move(*connected));
      return caf::atom("ok");
    },
    [this](release_atom) {
      teardown();
      return caf::atom("released");
    },
    // The engine lost another node: its pending UCX transfers end now, not at their deadline.
    [this](node_lost_atom, const caf::node_id& lost, std::string& reason) {
      if (link_)
        link_->cancel_peer(lost, std::move(reason));
    },
    // What this node's fault injector did for its current engine (zeros without a plan).
    [this](caf::get_atom, fault_atom) {
      transport::fault_counts counts = faults_ ? faults_->counts() : transport::fault_counts{};
      for (const auto& dev : devices_)
        counts.slowed_tasks += dev->stretched_tasks();
      return counts;
    },
    // What this node sent by UCX for its current engine: "<bytes> <messages> <E2A messages>"
    // (the caller reads all three: nodes and caller are one build).
    [this](caf::get_atom) -> std::string {
      return link_ ? std::to_string(link_->bytes_shipped()) + " " + std::to_string(link_->messages_shipped()) + " " +
                         std::to_string(link_->e2a_shipped())
                   : "0 0 0";
    },
    [this](link_atom, const std::string& transport, std::uint32_t process_idx) -> caf::result<std::string> {
      if (ctx_)
        return caf::make_error(caf::sec::runtime_error, "node " + name_ + ": link after hosting");
      if (transport == "nccl") {
        // Rows stay host memory at the actor boundary and are staged through the channel's
        // own device buffers, so any GPU serves; NCCL refuses two ranks of one communicator
        // on one GPU, so nodes sharing a machine take GPU (process index mod GPUs visible).
        std::size_t gpus = 0;
        for (const gpu::backend_info& info : gpu::compiled_backends())
          if (info.kind == gpu::backend_kind::cuda && info.usable)
            gpus = info.num_devices;
        auto link = tensor_link::create_nccl(gpus > 0 ? int(process_idx % gpus) : 0);
        if (!link.ok())
          return caf::make_error(caf::sec::runtime_error, "node " + name_ + ": " + link.err().message);
        link_ = std::move(*link);
        return std::string{};
      }
      auto kind = transport == "ucx-posix" ? moert::transport::ucx_transport::posix : moert::transport::ucx_transport::tcp;
      auto link = tensor_link::create(kind, process_idx);
      if (!link.ok())
        return caf::make_error(caf::sec::runtime_error, "node " + name_ + ": " + link.err().message);
      link_ = std::move(*link);
      return link_->address();
    },
    // Pipe bring-up (nccl): this node sends to `peer` on a new pipe; its id goes back.
    [this](link_atom, pipe_atom, const caf::node_id& peer) -> caf::result<std::string> {
      if (!link_ || !link_->uses_pipes())
        return caf::make_error(caf::sec::runtime_error, "node " + name_ + ": no tensor link with pipes");
      auto key = link_->open_send_to(peer);
      if (!key.ok())
        return caf::make_error(caf::sec::runtime_error, "node " + name_ + ": " + key.err().message);
      return std::string(key->begin(), key->end());
    },
    [this](link_atom, pipe_atom, const caf::node_id& peer, const std::string& id) -> caf::result<caf::atom_value> {
      if (!link_ || !link_->uses_pipes())
        return caf::make_error(caf::sec::runtime_error, "node " + name_ + ": no tensor link with pipes");
      transport::pipe_key key{};
      if (id.size() != key.size())
        return caf::make_error(caf::sec::runtime_error, "node " + name_ + ": a pipe id of " +
                                                            std::to_string(id.size()) + " bytes (expected " +
                                                            std::to_string(key.size()) + ")");
      std::copy(id.begin(), id.end(), key.begin());
      if (auto opened = link_->open_receive_from(peer, key); !opened.ok())
        return caf::make_error(caf::sec::runtime_error, "node " + name_ + ": " + opened.err().message);
      return caf::atom("ok");
    },
    [this](link_atom, const caf::node_id& peer, const std::string& address) -> caf::result<caf::atom_value> {
      if (!link_)
        return caf::make_error(caf::sec::runtime_error, "node " + name_ + ": no tensor link");
      if (auto added = link_->add_peer(peer, address); !added.ok())
        return caf::make_error(caf::sec::runtime_error, "node " + name_ + ": " + added.err().message);
      return caf::atom("ok");
    },
  };
}

}  // namespace moert::actors

namespace moert::actors {

// Forks a helper that sends SIGCONT after the stop's duration (it forks again so the node
// need not reap it), then stops this process; or kills it. Only async-signal-safe calls in
// the children: this process has many threads.
void carry_out_node_fault(const transport::fault_node& fault) {
  spdlog::warn("fault injector: node {} {}s itself after {} messages{}", fault.node, transport::to_string(fault.signal),
               fault.after_messages, fault.signal == transport::fault_signal::stop
                                         ? " for " + std::to_string(fault.for_ms) + " ms"
                                         : std::string{});
  if (fault.signal == transport::fault_signal::kill) {
    ::raise(SIGKILL);
    return;
  }
  pid_t self = ::getpid();
  pid_t child = ::fork();
  if (child == 0) {
    if (::fork() == 0) {
      timespec wait{time_t(fault.for_ms / 1000), long(fault.for_ms % 1000) * 1000000L};
      while (::nanosleep(&wait, &wait) != 0) {
      }
      ::kill(self, SIGCONT);
    }
    ::_exit(0);
  }
  if (child < 0) {
    spdlog::error("fault injector: cannot fork the helper that would resume node {}: not stopping", fault.node);
    return;
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  ::raise(SIGSTOP);
}

}  // namespace moert::actors
