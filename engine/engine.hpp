#pragma once

// moert's embedding API: build an Engine from a configuration, submit requests from any
// number of threads, and read each request's tokens as a stream (pull) or by callback.
//
//   auto engine = moert::Engine::create(config);            // result<unique_ptr<Engine>>
//   auto stream = (*engine)->submit({.prompt = {1, 2, 3}, .max_new_tokens = 8});
//   while (auto event = stream->next()) use(event->token);
//
// Given a seed, tokens and logits are bit-identical to the single-process reference forward
// whatever the number of devices, the plan or the queue scheduler (DESIGN.md §4).
//
// Thread safety: submit(), cancel() and the TokenStream members may be called from any
// thread. shutdown() (also run by the destructor) waits for every accepted request to finish.

#include "actors/token_sink.hpp"
#include "core/error.hpp"
#include "model/config.hpp"
#include "model/weights.hpp"
#include "model/sampler.hpp"
#include "policy/defrag.hpp"
#include "policy/perf_model.hpp"
#include "policy/plan.hpp"
#include "policy/replan.hpp"

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace moert {

using TokenEvent = actors::token_event;

struct EngineConfig {
  std::string model_dir;         // a Hugging Face checkpoint directory, or empty for …
  std::string synthetic_config;  // … a synthetic model: HF config.json text, seeded weights
  std::uint64_t weight_seed = 1;
  // Or a model already in memory, shared with its other users (wins over the two above).
  std::shared_ptr<const model::model_weights> weights;
  model::model_config weights_config;
  std::size_t attention_devices = 1;  // ag: attention shards
  std::size_t expert_devices = 1;     // eg: expert devices (experts placed round-robin)
  std::size_t threads_per_device = 1;
  // Every shard and expert posts to one device: the runtime on a single core, for comparing
  // its overhead with the bare forward.
  bool single_device = false;
  policy::execution_plan plan;
  // Online FinDEP: with a testbed, the policy actor re-solves the plan whenever the observed
  // batch or context length leaves the replan band (`plan` is then only the starting plan).
  std::optional<policy::testbed> online_testbed;
  policy::replan_params replan;
  policy::queue_policy scheduler = policy::queue_policy::defrag;
  policy::defrag_params defrag;
  std::size_t kv_capacity_tokens = std::size_t{1} << 20;  // per shard, prompt + new tokens
  std::size_t actor_threads = 2;                          // CAF scheduler threads
  bool trace = false;                                     // record a Perfetto trace
};

struct Request {
  std::uint64_t id = 0;  // 0: the engine assigns one. Sampling is keyed by it.
  std::vector<std::int32_t> prompt;
  std::size_t max_new_tokens = 16;
  model::sampling_params sampling;
  bool return_logits = false;         // logits each token was drawn from
  bool return_prompt_logits = false;  // logits at every prompt position, on the first event
};

// The tokens of one request, in order. Events arrive on engine threads and queue here.
class TokenStream {
public:
  // The next event, blocking until there is one; nullopt once the request has ended.
  std::optional<TokenEvent> next();
  // Every token of the request, or the error that ended it.
  result<std::vector<std::int32_t>> wait();
  bool done() const;

  // Engine side: appends an event (thread-safe).
  void push(TokenEvent event);

private:
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<TokenEvent> events_;
  std::vector<std::int32_t> tokens_;
  std::string error_;
  bool ended_ = false;
};

// End-of-run figures (DESIGN.md §6).
struct EngineReport {
  struct device_load {
    std::string name;
    double busy_fraction;  // busy time ÷ engine lifetime
  };
  std::vector<device_load> devices;
  double expert_batch_mean = 0, expert_batch_p50 = 0, expert_batch_p95 = 0;
  double executions_per_layer_wave = 0;  // fragmentation: expert runs per (layer, wave)
  double messages_per_token = 0;
  std::uint64_t tokens = 0;
  std::uint64_t replans = 0;         // online FinDEP re-solves
  double last_solve_micros = 0;
};

class Engine {
public:
  static result<std::unique_ptr<Engine>> create(EngineConfig config);
  ~Engine();

  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Never blocks on inference. A bad request (empty prompt, token id outside the vocabulary,
  // no tokens asked for, id in use, engine shut down) yields a stream that ends with an error.
  // `on_token`, if set, runs on an engine thread for each event before it is queued.
  std::shared_ptr<TokenStream> submit(Request request, std::function<void(const TokenEvent&)> on_token = {});
  void cancel(std::uint64_t request_id);
  // Refuses new requests, finishes the accepted ones, stops every actor and device.
  void shutdown();

  const model::model_config& model_config() const;
  // The FinDEP view of the model: the shapes the cost and memory models use.
  static policy::model_shape shape_of(const model::model_config& config);
  EngineReport report() const;
  // Chrome/Perfetto trace JSON (empty unless EngineConfig::trace).
  std::string trace_json() const;

private:
  struct impl;
  explicit Engine(std::unique_ptr<impl> state);
  std::unique_ptr<impl> impl_;
};

}  // namespace moert
