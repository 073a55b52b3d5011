#include "engine/engine.hpp"

#include "actors/attention_shard.hpp"
#include "actors/device.hpp"
#include "actors/expert.hpp"
#include "actors/ingress.hpp"
#include "actors/mu_queue.hpp"
#include "actors/policy_actor.hpp"
#include "actors/runtime.hpp"
#include "model/weights.hpp"

#include <caf/all.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <set>

namespace moert {

// -- TokenStream ------------------------------------------------------------------

void TokenStream::push(TokenEvent event) {
  {
    std::lock_guard<std::mutex> guard{mutex_};
    if (ended_)
      return;
    if (event.error.empty())
      tokens_.push_back(event.token);
    else
      error_ = event.error;
    ended_ = event.last;
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
  if (!error_.empty())
    return make_error(error_code::invalid_argument, error_);
  return tokens_;
}

bool TokenStream::done() const {
  std::lock_guard<std::mutex> guard{mutex_};
  return ended_;
}

// -- Engine -------------------------------------------------------------------------

struct Engine::impl {
  EngineConfig config;
  actors::runtime_stats stats;
  actors::trace_recorder trace;
  actors::runtime_context ctx;
  // Devices outlive the actors that post to them: declared before the actor system.
  std::vector<std::unique_ptr<actors::device>> devices;
  caf::actor_system_config system_config;
  std::unique_ptr<caf::actor_system> system;
  caf::actor ingress;
  std::vector<caf::actor> all_actors;

  std::mutex mutex;
  std::condition_variable idle;
  std::set<std::uint64_t> live_ids;
  std::uint64_t next_id = 1;
  bool accepting = true;
  bool stopped = false;
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
};

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

  auto state = std::make_unique<impl>();
  model::model_weights weights;
  if (config.weights) {
    state->ctx.config = config.weights_config;
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
    weights = model::synthetic_weights(*parsed, config.weight_seed);
  }
  if (config.expert_devices > std::size_t(state->ctx.config.num_experts))
    return invalid("expert_devices (" + std::to_string(config.expert_devices) + ") exceeds the number of experts (" +
                   std::to_string(state->ctx.config.num_experts) + ")");
  state->ctx.weights =
      config.weights ? config.weights : std::make_shared<const model::model_weights>(std::move(weights));
  state->ctx.num_expert_devices = config.expert_devices;
  state->ctx.stats = &state->stats;
  state->ctx.trace = config.trace ? &state->trace : nullptr;

  state->system_config.set("scheduler.max-threads", config.actor_threads);
  state->system_config.set("logger.verbosity", caf::atom("quiet"));
  state->system = std::make_unique<caf::actor_system>(state->system_config);
  caf::actor_system& sys = *state->system;
  const actors::runtime_context* ctx = &state->ctx;

  auto make_device = [&](const std::string& name) {
    if (config.single_device && !state->devices.empty())
      return state->devices.front().get();
    return state->devices
        .emplace_back(std::make_unique<actors::device>(config.single_device ? "device 0" : name,
                                                       config.threads_per_device, ctx->trace))
        .get();
  };
  actors::scheduler_update scheduler{config.scheduler, config.defrag};
  std::vector<caf::actor> queues;
  for (std::size_t d = 0; d < config.expert_devices; ++d) {
    actors::device* dev = make_device("expert " + std::to_string(d));
    caf::actor queue = sys.spawn<actors::mu_queue>(ctx, d, scheduler, dev->name());
    queues.push_back(queue);
    state->all_actors.push_back(queue);
    state->all_actors.push_back(sys.spawn<actors::expert>(ctx, d, dev, queue));
  }
  state->ingress = sys.spawn<actors::ingress>(config.kv_capacity_tokens);
  state->all_actors.push_back(state->ingress);
  std::vector<caf::actor> shards;
  for (std::size_t a = 0; a < config.attention_devices; ++a) {
    actors::device* dev = make_device("attention " + std::to_string(a));
    shards.push_back(sys.spawn<actors::attention_shard>(ctx, std::uint32_t(a), dev, queues, state->ingress,
                                                        config.plan));
  }
  state->all_actors.insert(state->all_actors.end(), shards.begin(), shards.end());
  std::optional<actors::online_problem> online;
  if (config.online_testbed)
    online = actors::online_problem{shape_of(state->ctx.config), *config.online_testbed, config.attention_devices,
                                    config.expert_devices, config.replan};
  caf::actor policy = sys.spawn<actors::policy_actor>(ctx, shards, queues, config.plan, scheduler, std::move(online));
  state->all_actors.push_back(policy);
  for (const auto& shard : shards)
    caf::anon_send(shard, actors::policy_atom::value, policy);
  caf::anon_send(state->ingress, shards);
  state->config = std::move(config);
  state->started = std::chrono::steady_clock::now();
  return std::unique_ptr<Engine>(new Engine(std::move(state)));
}

std::shared_ptr<TokenStream> Engine::submit(Request request, std::function<void(const TokenEvent&)> on_token) {
  auto stream = std::make_shared<TokenStream>();
  const model::model_config& c = impl_->ctx.config;
  auto refuse = [&](const std::string& why) {
    TokenEvent event{request.id, -1, 0, true, {}, {}, why};
    if (on_token)
      on_token(event);
    stream->push(std::move(event));
    return stream;
  };
  if (request.prompt.empty())
    return refuse("empty prompt");
  for (std::size_t i = 0; i < request.prompt.size(); ++i)
    if (request.prompt[i] < 0 || request.prompt[i] >= c.vocab_size)
      return refuse("token id " + std::to_string(request.prompt[i]) + " at position " + std::to_string(i) +
                    " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
  if (request.max_new_tokens == 0)
    return refuse("max_new_tokens must be at least 1");
  {
    std::lock_guard<std::mutex> guard{impl_->mutex};
    if (!impl_->accepting)
      return refuse("the engine is shut down");
    if (request.id == 0) {
      while (impl_->live_ids.count(impl_->next_id))
        ++impl_->next_id;
      request.id = impl_->next_id++;
    } else if (impl_->live_ids.count(request.id)) {
      return refuse("request id " + std::to_string(request.id) + " is already in use");
    }
    impl_->live_ids.insert(request.id);
  }
  actors::admit_request admit;
  admit.request_id = request.id;
  admit.prompt = std::move(request.prompt);
  admit.max_new_tokens = request.max_new_tokens;
  admit.sampling = request.sampling;
  admit.return_logits = request.return_logits;
  admit.return_prompt_logits = request.return_prompt_logits;
  impl* state = impl_.get();
  std::uint64_t id = request.id;
  admit.sink = std::make_shared<actors::token_sink>(
      [stream, on_token = std::move(on_token), state, id](actors::token_event event) {
        bool last = event.last;
        if (on_token)
          on_token(event);
        stream->push(std::move(event));
        if (last) {
          std::lock_guard<std::mutex> guard{state->mutex};
          state->live_ids.erase(id);
          state->idle.notify_all();
        }
      });
  caf::anon_send(impl_->ingress, std::move(admit));
  return stream;
}

void Engine::cancel(std::uint64_t request_id) {
  caf::anon_send(impl_->ingress, actors::cancel_atom::value, request_id);
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
  for (auto& actor : impl_->all_actors)
    caf::anon_send_exit(actor, caf::exit_reason::user_shutdown);
  impl_->all_actors.clear();
  impl_->ingress = nullptr;
  impl_->system->await_all_actors_done();
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

const model::model_config& Engine::model_config() const {
  return impl_->ctx.config;
}

EngineReport Engine::report() const {
  EngineReport out;
  double lifetime = std::chrono::duration<double>(std::chrono::steady_clock::now() - impl_->started).count();
  for (const auto& dev : impl_->devices)
    out.devices.push_back({dev->name(), std::chrono::duration<double>(dev->busy_time()).count() / lifetime});
  auto sizes = impl_->stats.expert_batch_sizes();
  if (!sizes.empty()) {
    std::sort(sizes.begin(), sizes.end());
    double sum = 0;
    for (auto s : sizes)
      sum += double(s);
    out.expert_batch_mean = sum / double(sizes.size());
    out.expert_batch_p50 = double(sizes[sizes.size() / 2]);
    out.expert_batch_p95 = double(sizes[std::min(sizes.size() - 1, sizes.size() * 95 / 100)]);
  }
  out.executions_per_layer_wave = impl_->stats.executions_per_layer_wave();
  out.tokens = impl_->stats.tokens();
  out.replans = impl_->stats.replans();
  out.last_solve_micros = impl_->stats.last_solve_micros();
  out.messages_per_token = out.tokens ? double(impl_->stats.messages()) / double(out.tokens) : 0.0;
  return out;
}

std::string Engine::trace_json() const {
  return impl_->config.trace ? impl_->trace.to_json() : std::string{};
}

}  // namespace moert
