#pragma once

// What every actor of one engine shares: the model (read-only), the expert placement, and
// the run's counters. Owned by the engine, which outlives its actors.

#include "actors/trace.hpp"
#include "gpu/registry.hpp"
#include "model/config.hpp"
#include "model/weights.hpp"
#include "policy/perf_model.hpp"
#include "transport/fault_injector.hpp"

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

namespace moert::actors {

class device;

// Which expert device hosts each routed expert now. Starts round-robin (expert e on device
// e mod eg); only the supervisor moves experts (Engine::move_expert, and recovery re-placing
// a lost device's experts). Thread safety: any actor reads it at any time (one atomic per
// expert); a reader may see a move late, and the rows it then sends to the old device are
// forwarded by that device's μ-queue (mu_queue.hpp), so a late read loses nothing.
class expert_placement {
public:
  expert_placement(std::size_t num_experts, std::size_t num_devices);

  std::size_t num_experts() const { return num_experts_; }
  std::size_t device_of(std::size_t expert) const { return device_[expert].load(std::memory_order_acquire); }
  void move(std::size_t expert, std::size_t device) { device_[expert].store(std::uint32_t(device), std::memory_order_release); }
  std::vector<std::uint32_t> experts_on(std::size_t device) const;  // ascending ids

private:
  std::size_t num_experts_;
  std::unique_ptr<std::atomic<std::uint32_t>[]> device_;
};

// Expert batch sizes as a histogram of fixed size: exact counts below `exact_limit` tokens,
// above it 64 sub-buckets per power of two (a percentile there is off by < 1/64). The mean
// is exact. Memory does not grow with the run (it used to keep every batch size).
class size_histogram {
public:
  static constexpr std::size_t exact_limit = 1024;
  static constexpr std::size_t sub_buckets = 64;

  void add(std::size_t value);
  std::uint64_t count() const { return count_; }
  double mean() const { return count_ ? double(sum_) / double(count_) : 0.0; }
  // The value of rank `rank` (0-based) in sorted order; a bucket's lower bound above the limit.
  double at_rank(std::uint64_t rank) const;
  static constexpr std::size_t num_buckets() { return exact_limit + 64 * sub_buckets; }

private:
  static std::size_t bucket_of(std::size_t value);
  static std::size_t lower_bound_of(std::size_t bucket);

  std::vector<std::uint64_t> buckets_ = std::vector<std::uint64_t>(num_buckets(), 0);
  std::uint64_t count_ = 0;
  long double sum_ = 0;
};

// Counters for the end-of-run report. Thread safety: all members may be used from any thread.
// Memory is bounded: batch sizes go to a fixed histogram, and a (layer, wave) is remembered
// only while its shard may still run batches of it (see record_expert_batch).
class runtime_stats {
public:
  struct batch_summary {
    std::uint64_t count = 0;
    double mean = 0, p50 = 0, p95 = 0;
  };

  void count_messages(std::uint64_t n) { messages_ += n; }
  // The expert path's control messages (a batch handed over or finished, not its data): the
  // per-token cost of giving each expert its own actor, asserted in tests/engine/expert_actors.
  void count_control(std::uint64_t n) { control_ += n; }
  void count_retransmit_timer() { ++retransmit_timers_; }  // at-least-once timers sent
  // Rows a μ-queue sent on to another device because their expert moved (mu_queue.hpp).
  void count_forwarded(std::uint64_t rows) { forwarded_ += rows; }
  void count_tokens(std::uint64_t n) { tokens_ += n; }
  void record_expert_batch(std::uint32_t layer, std::size_t tokens,
                           const std::vector<std::tuple<std::uint32_t, std::uint64_t>>& waves);

  void record_replan(double solve_micros);
  // The hot actors' mailboxes (issue [E] part 4): each one reads its own mailbox().size() as
  // it takes a data message (the ingress an admission, a shard an E2A, a μ-queue an A2E, an
  // expert a batch) and the largest stays here. Admission and the plan bound them, not the
  // load: EngineReport::mailbox_peak_*, asserted under 10x overload (tests/engine/overload).
  enum class mailbox_kind : std::uint8_t { ingress, shard, queue, expert };
  void note_mailbox(mailbox_kind kind, std::size_t queued) {
    auto& peak = mailbox_peaks_[std::size_t(kind)];
    std::size_t seen = peak.load(std::memory_order_relaxed);
    while (queued > seen && !peak.compare_exchange_weak(seen, queued, std::memory_order_relaxed)) {
    }
  }
  std::size_t mailbox_peak(mailbox_kind kind) const { return mailbox_peaks_[std::size_t(kind)].load(); }
  // Requests pinned to a shard and queued at the ingress (the ingress sets both).
  void set_load(std::size_t running, std::size_t waiting) {
    running_ = running;
    waiting_ = waiting;
  }

  std::uint64_t messages() const { return messages_; }
  std::uint64_t control_messages() const { return control_; }
  std::uint64_t retransmit_timers() const { return retransmit_timers_; }
  std::uint64_t forwarded_rows() const { return forwarded_; }
  std::uint64_t replans() const { return replans_; }
  double last_solve_micros() const;
  std::uint64_t tokens() const { return tokens_; }
  std::size_t running() const { return running_; }
  std::size_t waiting() const { return waiting_; }
  // Mean, p50 (rank n/2) and p95 (rank min(n-1, 95n/100)) of the expert batch sizes.
  batch_summary expert_batches() const;
  // Mean expert executions per (layer, wave): a wave is one step of one shard's micro-batches
  // passing a layer. Higher means the wave was split into more, smaller batches.
  double executions_per_layer_wave() const;
  // How many (layer, shard, step) waves are remembered now: stays bounded over a run.
  std::size_t remembered_waves() const;

private:
  std::atomic<std::uint64_t> messages_{0};
  std::atomic<std::uint64_t> control_{0};
  std::atomic<std::uint64_t> retransmit_timers_{0};
  std::atomic<std::uint64_t> forwarded_{0};
  std::atomic<std::uint64_t> tokens_{0};
  std::atomic<std::uint64_t> replans_{0};
  std::atomic<std::size_t> running_{0};
  std::atomic<std::size_t> waiting_{0};
  std::array<std::atomic<std::size_t>, 4> mailbox_peaks_{};
  mutable std::mutex mutex_;  // guards the members below
  double last_solve_micros_ = 0.0;
  size_histogram batch_sizes_;
  std::uint64_t executions_ = 0;  // Σ over waves of their expert executions
  std::uint64_t waves_ = 0;       // distinct (layer, shard, step)
  // Recent steps per (layer, shard) that already count as a wave; older ones are forgotten.
  std::map<std::pair<std::uint32_t, std::uint32_t>, std::vector<std::uint64_t>> recent_;
};

struct runtime_context {
  model::model_config config;
  std::shared_ptr<const model::model_weights> weights;
  std::size_t num_expert_devices = 1;
  runtime_stats* stats = nullptr;
  trace_recorder* trace = nullptr;  // null when not tracing
  class tensor_link* link = nullptr;  // a cluster's UCX data path; null: rows travel in messages
  // The backend every device of this engine runs (EngineConfig::backend).
  gpu::backend_kind backend = gpu::backend_kind::cpu;
  // The engine's fault plan at work (actors/fault_seam.hpp); an engine or node always has one
  // (transport::without_faults without a fault file), so A2E/E2A delivery is at least once.
  // Null only in unit tests that build a context by hand: no retransmission then.
  transport::fault_injector* faults = nullptr;
  // Chunked prefill (EngineConfig::prefill_chunk_tokens): a step feeds at most this many
  // tokens of a prompt, so the decode rows beside it never wait for a whole long prompt.
  // 0: every prompt whole in one step.
  std::size_t prefill_chunk_tokens = 0;
  // The engine's record of the actors it spawned (actors/census.hpp); spawn sites add to it.
  // Null: nobody counts (unit tests, nodes).
  class actor_census* census = nullptr;

  // Where each expert is now; null: round-robin for good (a node of a cluster, unit tests).
  std::shared_ptr<expert_placement> placement;
  // This process's expert devices by global index (null: another process's), owned by the
  // engine or node, outliving every actor. The expert actors run each batch on the device of
  // the μ-queue that handed it.
  std::vector<device*> expert_devices;

  std::size_t device_of(std::size_t expert) const {
    return placement ? placement->device_of(expert) : expert % num_expert_devices;
  }
  std::vector<std::uint32_t> hosted_by(std::size_t device) const;  // ascending ids
  // Round-robin placement, as it starts: expert e on device e mod eg as its local expert e div eg.
  std::size_t local_index(std::size_t expert) const { return expert / num_expert_devices; }
  std::size_t global_expert(std::size_t device, std::size_t local) const {
    return local * num_expert_devices + device;
  }
  std::size_t experts_on(std::size_t device) const {
    std::size_t e = std::size_t(config.num_experts);
    return e / num_expert_devices + (device < e % num_expert_devices ? 1 : 0);
  }
};

// Whether `kind` can run here: an error naming why not (not compiled into this build, or no
// device present), checked before an engine loads anything.
[[nodiscard]] status check_backend(gpu::backend_kind kind);

// The grouped/dense switch a cuda device starts with: `crossover` as `moert calibrate --backend
// cuda` wrote it into a testbed, or (none) the backend's uncalibrated default.
gpu::gemm_calibration gemm_calibration_from(const std::optional<policy::expert_gemm_crossover>& crossover);

// The backend of the engine's device `device_index` (attention and expert devices numbered
// together), through gpu/registry: cpu with `num_threads` kernel threads, or cuda on GPU
// device_index mod the GPUs visible, so one GPU hosts every device's stream when it is alone.
// `expert_gemm` is the calibrated grouped/dense switch a cuda device starts with.
result<std::unique_ptr<gpu::backend>> make_device_backend(gpu::backend_kind kind, std::size_t device_index,
                                                          std::size_t num_threads,
                                                          const gpu::gemm_calibration& expert_gemm = {});

// A device on a backend of `kind` (make_device_backend) that holds its own part of the model,
// uploaded to that backend: `part` read from `checkpoint`, or, when `checkpoint` is null, the
// same part of the synthetic weights of (`config`, `weight_seed`). What the engine builds per
// device off the cpu backend (or with per_device_weights), and what a cluster node builds on
// its backend. Blocking (it loads weights); errors name `name` and the backend.
result<std::unique_ptr<device>> make_device_with_weights(const std::string& name, gpu::backend_kind kind,
                                                         std::size_t device_index, std::size_t num_threads,
                                                         const gpu::gemm_calibration& expert_gemm,
                                                         const model::model_config& config,
                                                         const model::checkpoint* checkpoint,
                                                         std::uint64_t weight_seed, const model::load_options& part,
                                                         trace_recorder* trace);

}  // namespace moert::actors
