#pragma once

// What every actor of one engine shares: the model (read-only), the expert placement, and
// the run's counters. Owned by the engine, which outlives its actors.

#include "actors/trace.hpp"
#include "model/config.hpp"
#include "model/weights.hpp"

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

namespace moert::actors {

// Counters for the end-of-run report. Thread safety: all members may be used from any thread.
class runtime_stats {
public:
  void count_messages(std::uint64_t n) { messages_ += n; }
  void count_tokens(std::uint64_t n) { tokens_ += n; }
  void record_expert_batch(std::uint32_t layer, std::size_t tokens,
                           const std::vector<std::tuple<std::uint32_t, std::uint64_t>>& waves);

  void record_replan(double solve_micros);

  std::uint64_t messages() const { return messages_; }
  std::uint64_t replans() const { return replans_; }
  double last_solve_micros() const;
  std::uint64_t tokens() const { return tokens_; }
  std::vector<std::size_t> expert_batch_sizes() const;
  // Mean expert executions per (layer, wave): a wave is one step of one shard's micro-batches
  // passing a layer. Higher means the wave was split into more, smaller batches.
  double executions_per_layer_wave() const;

private:
  std::atomic<std::uint64_t> messages_{0};
  std::atomic<std::uint64_t> tokens_{0};
  std::atomic<std::uint64_t> replans_{0};
  double last_solve_micros_ = 0.0;  // guarded by mutex_
  mutable std::mutex mutex_;
  std::vector<std::size_t> batch_sizes_;
  std::map<std::tuple<std::uint32_t, std::uint32_t, std::uint64_t>, std::size_t> executions_;
};

struct runtime_context {
  model::model_config config;
  std::shared_ptr<const model::model_weights> weights;
  std::size_t num_expert_devices = 1;
  runtime_stats* stats = nullptr;
  trace_recorder* trace = nullptr;  // null when not tracing

  // Round-robin placement: expert e lives on device e mod eg as its local expert e div eg.
  std::size_t device_of(std::size_t expert) const { return expert % num_expert_devices; }
  std::size_t local_index(std::size_t expert) const { return expert / num_expert_devices; }
  std::size_t global_expert(std::size_t device, std::size_t local) const {
    return local * num_expert_devices + device;
  }
  std::size_t experts_on(std::size_t device) const {
    std::size_t e = std::size_t(config.num_experts);
    return e / num_expert_devices + (device < e % num_expert_devices ? 1 : 0);
  }
};

}  // namespace moert::actors
