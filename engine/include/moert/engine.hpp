#pragma once

// moert's embedding API: build an Engine from a configuration, submit requests from any
// number of threads, and read each request's tokens as a stream (pull) or by callback.
//
//   #include <moert/engine.hpp>
//   auto engine = moert::Engine::create(config);            // result<unique_ptr<Engine>>
//   auto stream = (*engine)->submit({.prompt = {1, 2, 3}, .max_new_tokens = 8});
//   while (auto event = stream->next()) use(event->token);
//
// Given a seed, tokens and logits are bit-identical to the single-process reference forward
// whatever the number of devices, the plan or the queue scheduler (DESIGN.md §4).
//
// This header speaks moert's own types only: it pulls in neither CAF nor a kernel header
// (the model's weights are forward-declared; include "model/weights.hpp" to build them).
//
// Thread safety: every Engine member and every TokenStream member may be called from any
// thread. shutdown() (also run by the destructor) waits for every accepted request to finish.

#include "core/error.hpp"
#include "engine/cluster_config.hpp"
#include "engine/fault_plan.hpp"
#include "gpu/backend.hpp"
#include "model/config.hpp"
#include "model/sampler.hpp"
#include "policy/defrag.hpp"
#include "policy/perf_model.hpp"
#include "policy/plan.hpp"
#include "policy/replan.hpp"

#include <chrono>
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

namespace model {
struct model_weights;  // model/weights.hpp
}

// -- events --------------------------------------------------------------------------

// Why a request ended; set on its last event only.
enum class FinishReason {
  none,       // not the last event
  length,     // max_new_tokens generated
  stop,       // the last token is an EOS or one of Request::stop_token_ids
  cancelled,  // Engine::cancel
  error,      // see TokenEvent::error_code
};

enum class ErrorCode {
  none,
  invalid_request,   // empty prompt, token outside the vocabulary, id in use, bad parameter
  context_too_long,  // prompt (+ max_new_tokens) beyond max_context_tokens() or a shard's KV
  overloaded,        // EngineConfig::max_inflight_requests reached: retry later
  shutdown,          // the engine stopped accepting requests
  internal,          // a bug or a failed component: the message says which
  deadline_exceeded, // Request::deadline passed before the request ended
};

const char* to_string(FinishReason reason);
const char* to_string(ErrorCode code);

struct TopLogprob {
  std::int32_t token;
  float logprob;
};

// On the last event of a request, in milliseconds of the steady clock.
struct RequestTimings {
  double queue_wait_ms = 0;               // submit -> admitted to a shard
  double time_to_first_token_ms = 0;      // submit -> first token
  double mean_time_between_tokens_ms = 0; // over tokens 2..n
  double total_ms = 0;                    // submit -> last event
};

// One generated token, or the end of a request.
struct TokenEvent {
  std::uint64_t request_id = 0;
  std::int32_t token = -1;  // -1 on a last event that carries no token (error, cancel)
  std::size_t index = 0;    // 0 for the first generated token
  bool last = false;        // no more events follow for this request
  FinishReason finish_reason = FinishReason::none;
  ErrorCode error_code = ErrorCode::none;
  std::string error;                      // non-empty exactly when error_code != none
  // log-softmax of `token` over the raw logits (before temperature, top-k, top-p), when
  // Request::logprobs or top_logprobs > 0
  float logprob = 0;
  std::vector<TopLogprob> top_logprobs;   // the Request::top_logprobs best, highest first
  std::vector<float> logits;              // the logits the token was drawn from, when return_logits
  std::vector<float> prompt_logits;       // first event, when return_prompt_logits (prompt × vocab)
  RequestTimings timings;                 // last event only
};

// -- configuration and requests --------------------------------------------------------

struct EngineConfig {
  std::string model_dir;         // a Hugging Face checkpoint directory, or empty for …
  std::string synthetic_config;  // … a synthetic model: HF config.json text, seeded weights
  std::uint64_t weight_seed = 1;
  // Or a model already in memory, shared with its other users (wins over the two above).
  std::shared_ptr<const model::model_weights> weights;
  model::model_config weights_config;
  std::size_t attention_devices = 1;  // ag: attention shards
  std::size_t expert_devices = 1;     // eg: expert devices (experts placed round-robin at start)
  std::size_t threads_per_device = 1;
  // The compute backend of every device: cpu (always built, the reference) or cuda (built
  // with CUDA; the engine's device i runs on GPU i mod the GPUs visible). Engine::create fails
  // with a message naming the reason when it is not compiled in or no device is present.
  gpu::backend_kind backend = gpu::backend_kind::cpu;
  // Each device loads its own part of the weights onto its backend (an expert device only its
  // experts; an attention device embeddings, attention, norms, router, shared/dense experts
  // and lm_head), as GPUs need. Always so on a backend other than cpu; on cpu it is for tests
  // and comparisons (the default shares one host copy). Not with `weights` or a cluster.
  bool per_device_weights = false;
  // The grouped/dense switch of a cuda device's expert GEMMs, from `moert calibrate --backend
  // cuda` (its testbed's "expert_gemm"); unset: online_testbed's, else the uncalibrated default
  // (the report says which).
  std::optional<policy::expert_gemm_crossover> expert_gemm;
  // Every shard and expert posts to one device: the runtime on a single core, for comparing
  // its overhead with the bare forward.
  bool single_device = false;
  policy::execution_plan plan;
  // The placement from the machine (policy/placement.hpp, issue [P] part 3): with a testbed
  // here, Engine::create replaces attention_devices, expert_devices, threads_per_device,
  // single_device (and, for a disaggregated choice, the plan's r1, r2 and order) by the best
  // predicted placement of placement_cores cores (0: this machine's). On a small CPU machine
  // that is one device with every core running attention and experts in turn. Ignored with a
  // cluster. What was chosen, and why: Engine::placement().
  std::optional<policy::testbed> placement_testbed;
  std::size_t placement_cores = 0;
  // Online FinDEP: with a testbed, the policy actor re-solves the plan whenever the observed
  // batch or context length leaves the replan band (`plan` is then only the starting plan).
  std::optional<policy::testbed> online_testbed;
  policy::replan_params replan;
  policy::queue_policy scheduler = policy::queue_policy::defrag;
  policy::defrag_params defrag;
  std::size_t kv_capacity_tokens = std::size_t{1} << 20;  // per shard, prompt + new tokens
  // Chunked prefill: a step feeds at most this many tokens of each prompt (the rest in later
  // steps), so sequences decoding beside a long prompt get a token every step. Tokens and
  // logits are those of a whole-prompt prefill. 0: every prompt whole. Requests that ask for
  // prompt logits are prefilled whole.
  std::size_t prefill_chunk_tokens = 512;
  std::size_t actor_threads = 2;                          // CAF scheduler threads
  bool trace = false;                                     // record a Perfetto trace
  // Admission: requests submitted and not yet ended (running or queued). Beyond it submit()
  // ends the stream at once with ErrorCode::overloaded. 0 = unlimited.
  std::size_t max_inflight_requests = 0;
  // Admission: prompt tokens of the requests waiting for a shard (vLLM's max-num-queued-tokens,
  // sized as target queueing time x prefill rate). A request that would pass it ends at once
  // with ErrorCode::overloaded. 0 = unlimited.
  std::size_t max_queued_tokens = 0;
  // A cluster: `moert node` processes host the attention shards and expert devices the
  // file places on them (it then decides attention_devices and expert_devices); this process
  // keeps the ingress, the policy actor and the token sinks. Tokens and logits are those of
  // one process with the same numbers of devices. Nodes load model_dir (or build the
  // synthetic model) themselves; `weights` cannot travel.
  std::optional<cluster_config> cluster;
  // The cluster's shared secret (transport/auth_gate): every connection to a node passes a
  // mutual HMAC handshake first. Empty: connect directly, which only loopback nodes allow.
  std::string cluster_secret;
  // Or TLS with certificates (CAF's OpenSSL module) for networks that are not trusted: this
  // process's certificate and key (PEM) and the CA that signed every node's; nodes verify
  // ours the same way. Then the rows go encrypted only with transport "caf" (UCX does not
  // encrypt).
  cluster_tls tls;
  // How long bring-up waits for a node to connect and load its part.
  std::chrono::milliseconds cluster_timeout{60000};
  // Supervision (one process): an attention shard, μ-queue or expert actor (one per routed
  // expert) that dies is re-created and its work replayed, so every request completes with the
  // tokens and logits it would have had. More than max_restarts restarts within restart_period
  // of one expert make its expert device count as lost: its experts are re-placed on the
  // surviving expert devices (Engine::move_expert). Past that limit for shards and queues
  // together, or with no expert device left, the engine's data path stops: every request ends
  // with ErrorCode::internal naming what died, and new ones are refused.
  std::size_t max_restarts = 3;
  std::chrono::milliseconds restart_period{10000};
  // A fault plan (engine/fault_plan.hpp, `--faults FILE`): seeded drops, duplicates,
  // reorders and delays of A2E/E2A messages, actor kills and slow devices. A2E/E2A delivery is
  // always at least once (missing expert outputs are asked again, duplicates ignored), so
  // message faults change no token and no logit; the plan's "retransmit" sets its timeouts,
  // without a plan they are generous (first after 1 s, transport::without_faults). With a cluster every node gets the plan at
  // bring-up and applies it at its own send seam (the same seeded decision per message), kills
  // and slows act on the node hosting the named device, and the plan's "nodes" kill or stop
  // node processes; the report sums what every surviving node injected.
  std::optional<fault_plan> faults;
};

struct Request {
  std::uint64_t id = 0;  // 0: the engine assigns one. Sampling is keyed by it.
  std::vector<std::int32_t> prompt;
  std::size_t max_new_tokens = 16;
  model::sampling_params sampling;
  bool return_logits = false;         // logits each token was drawn from
  bool return_prompt_logits = false;  // logits at every prompt position, on the first event
  // Generation ends (finish stop) after emitting one of these; the model's EOS ids
  // (Engine::eos_token_ids) are added unless ignore_eos. The stop token is the last event's.
  std::vector<std::int32_t> stop_token_ids = {};
  bool ignore_eos = false;
  bool logprobs = false;          // TokenEvent::logprob
  std::size_t top_logprobs = 0;   // 0..20: TokenEvent::top_logprobs
  // From submit(): a request not ended by then (waiting or running) ends with
  // ErrorCode::deadline_exceeded, keeping the tokens it already streamed. 0 = none.
  std::chrono::milliseconds deadline{0};
};

// The events of one request, in order. Events arrive on engine threads and queue here.
class TokenStream {
public:
  // The next event, blocking until there is one; nullopt once the request has ended.
  std::optional<TokenEvent> next();
  // Every token of the request, or the error that ended it (also "cancelled").
  result<std::vector<std::int32_t>> wait();
  bool done() const;
  // Of the last event; none while the request runs.
  FinishReason finish_reason() const;
  ErrorCode error_code() const;

  // Engine side: appends an event (thread-safe).
  void push(TokenEvent event);

private:
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<TokenEvent> events_;
  std::vector<std::int32_t> tokens_;
  std::string error_;
  FinishReason finish_ = FinishReason::none;
  ErrorCode error_code_ = ErrorCode::none;
  bool ended_ = false;
};

// End-of-run figures (DESIGN.md §6).
struct EngineReport {
  struct device_load {
    std::string name;
    double busy_fraction;  // busy time ÷ engine lifetime
    std::string backend;   // its backend's name ("cpu (avx512, 1 threads)", "cuda:0 (NVIDIA H200)")
    // Bytes of weights the device holds itself (per-device weights), by type; 0 when it reads
    // the engine's shared host copy.
    std::size_t weight_bytes = 0;
  };
  std::vector<device_load> devices;
  // The cuda devices' expert GEMM switch: "dense from N rows (calibrated: <source>)", or the
  // default marked "not calibrated"; empty on the cpu backend.
  std::string expert_gemm_switch;
  double expert_batch_mean = 0, expert_batch_p50 = 0, expert_batch_p95 = 0;
  double executions_per_layer_wave = 0;  // fragmentation: expert runs per (layer, wave)
  double messages_per_token = 0;
  // Counts behind messages_per_token: data messages (A2E, batches handed to experts, E2A), the
  // expert path's control messages (a batch finished), and expert batches run.
  std::uint64_t messages = 0, control_messages = 0, expert_batches = 0;
  // At-least-once timers the shards sent (CAF clock messages): about one per micro-batch and
  // retransmission timeout, not one per layer and step.
  std::uint64_t retransmit_timers = 0;
  // Actor activations that the in-process devices' own threads ran (a completion's actor and
  // what it messaged in turn): the hops of the expert path, each a few µs on the critical path.
  std::uint64_t device_actor_activations = 0;
  // Rows sent on from one expert device to another because their expert moved.
  std::uint64_t forwarded_rows = 0;
  std::uint64_t tokens = 0;
  std::uint64_t replans = 0;         // online FinDEP re-solves
  double last_solve_micros = 0;
  // Requests by how they ended (rejected ones count as errors).
  std::uint64_t finished_length = 0, finished_stop = 0, cancelled = 0, errors = 0;
  // A cluster only: bytes through this process's gates to the nodes, both ways (over TLS: every
  // TLS byte of this process, before encryption), counted from bring-up; CAF control, and rows
  // only if node-to-node messages were routed through this process; and what the nodes sent
  // by UCX (asked at report time), of those messages the E2A (the rest are A2E).
  std::uint64_t cluster_caf_bytes = 0, cluster_ucx_bytes = 0, cluster_ucx_messages = 0, cluster_ucx_e2a_messages = 0;
  // A cluster only: the nodes lost (by name), each part re-placed on a survivor (e.g. "expert
  // device 1 -> e0", with the lost node's reason and the time from the loss noticed to the
  // replay sent, in ms), and whether recovery gave up (every request then ended with an error).
  struct node_recovery {
    std::string lost;
    std::string what;
    std::chrono::steady_clock::time_point noticed{};  // when the loss was noticed
    double recovery_ms = 0;
  };
  std::vector<std::string> lost_nodes;
  std::vector<node_recovery> node_recoveries;
  bool cluster_recovery_failed = false;
  // Supervision: actors re-created, whether it gave up, and the supervisor's own time for the
  // last restart (down message to replay sent), in milliseconds.
  std::uint64_t restarts = 0;
  bool supervision_escalated = false;
  double last_restart_ms = 0;
  // With EngineConfig::faults: what the injector did, by type, and what delivery did about it.
  // Without a plan the delivery counts are still filled in (A2E/E2A delivery is always at
  // least once: `retransmitted`, `ignored_e2a`, `failed_batches`).
  bool faults_enabled = false;
  transport::fault_counts faults;
  // Leak check, read after shutdown(): actors this engine spawned (re-created ones included),
  // how many were still running once shutdown had told every actor to stop and waited 10 s
  // (then they were killed), and how many exited actors were still held 2 s after that (a
  // leaked handle or a cycle of handles). Both are 0 unless something leaks; the log names
  // them. In a cluster only this process's actors count (a node frees its own).
  std::size_t actors_spawned = 0;
  std::size_t actors_running_after_shutdown = 0;
  std::size_t actors_alive_after_shutdown = 0;
  // Bounded mailboxes: the most messages queued behind a data message in any ingress
  // (admissions), attention shard (E2A), μ-queue (A2E) and expert actor (batches), over the
  // run. Admission (max_inflight_requests) and the plan bound them, not the offered load
  // (tests/engine/overload derives the bounds). This process's actors only.
  std::size_t mailbox_peak_ingress = 0, mailbox_peak_shard = 0, mailbox_peak_queue = 0, mailbox_peak_expert = 0;
};

// Requests admitted to a shard (running) and submitted but not yet admitted (waiting), now.
struct EngineLoad {
  std::size_t running = 0, waiting = 0;
};

class Engine {
public:
  static result<std::unique_ptr<Engine>> create(EngineConfig config);
  ~Engine();

  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Never blocks on inference. A bad request (empty prompt, token id outside the vocabulary,
  // no tokens asked for, id in use, context too long, overload, engine shut down) yields a
  // stream that ends with an error code. `on_token`, if set, runs on an engine thread for
  // each event before it is queued, one call at a time per request; keep it short. When a
  // request's last event is seen (here or on the stream), its id is free for a new request.
  std::shared_ptr<TokenStream> submit(Request request, std::function<void(const TokenEvent&)> on_token = {});
  // Ends the request with FinishReason::cancelled (unknown or ended ids are ignored).
  void cancel(std::uint64_t request_id);
  // Refuses new requests, finishes the accepted ones, stops every actor and device.
  void shutdown();
  // Fault injection: the actor `kind` dies as if it had crashed; the supervisor recovers it.
  // "expert": the actor of routed expert `idx`; "expert_device": every expert actor placed on
  // expert device `idx`; "queue", "attention": that of device `idx`. One process only.
  status kill_actor(const std::string& kind, std::size_t idx);
  // Moves routed expert `expert_id` (its actor keeps running) to expert device `device` at run
  // time without losing a token: the old device's μ-queue stops handing it batches and forwards
  // its queued rows, and any A2E still sent there, to the new one; shards route by the new
  // placement from then on. Outputs stay bit-identical. Returns once the move is ordered (the
  // rows already queued follow asynchronously). Errors name a bad expert or device, a device
  // lost to faults, a cluster (one process only), or per-device weights (per_device_weights or
  // a device backend: a device holds only its own experts). Thread-safe.
  status move_expert(std::size_t expert_id, std::size_t device);
  // The expert device of each routed expert now (by expert id). Thread-safe.
  std::vector<std::size_t> expert_placement() const;

  const model::model_config& model_config() const;
  std::size_t vocab_size() const;
  std::size_t max_context_tokens() const;  // max_position_embeddings: prompt + new tokens
  std::vector<std::int32_t> eos_token_ids() const;  // config.json eos_token_id; may be empty
  EngineLoad load() const;
  // The FinDEP view of the model: the shapes the cost and memory models use.
  static policy::model_shape shape_of(const model::model_config& config);
  // Applies config.placement_testbed to `config` (see there) for this model; returns what was
  // chosen and why, or "" when it has no testbed (or a cluster). Engine::create calls it.
  static result<std::string> resolve_placement(EngineConfig& config, const model::model_config& model);
  // "2 attention + 1 expert devices, 1 thread each" or "1 device (attention and experts), 2
  // threads", with the placement choice's reason when it came from the testbed.
  std::string placement() const;
  EngineReport report() const;
  // Chrome/Perfetto trace JSON (empty unless EngineConfig::trace).
  std::string trace_json() const;

private:
  struct impl;
  explicit Engine(std::unique_ptr<impl> state);
  std::unique_ptr<impl> impl_;
};

}  // namespace moert
