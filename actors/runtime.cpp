#include "actors/runtime.hpp"

#include <set>

namespace moert::actors {

void runtime_stats::record_expert_batch(std::uint32_t layer, std::size_t tokens,
                                        const std::vector<std::tuple<std::uint32_t, std::uint64_t>>& waves) {
  std::lock_guard<std::mutex> guard{mutex_};
  batch_sizes_.push_back(tokens);
  std::set<std::tuple<std::uint32_t, std::uint64_t>> distinct(waves.begin(), waves.end());
  for (const auto& [shard, step] : distinct)
    ++executions_[{layer, shard, step}];
}

void runtime_stats::record_replan(double solve_micros) {
  std::lock_guard<std::mutex> guard{mutex_};
  ++replans_;
  last_solve_micros_ = solve_micros;
}

double runtime_stats::last_solve_micros() const {
  std::lock_guard<std::mutex> guard{mutex_};
  return last_solve_micros_;
}

std::vector<std::size_t> runtime_stats::expert_batch_sizes() const {
  std::lock_guard<std::mutex> guard{mutex_};
  return batch_sizes_;
}

double runtime_stats::executions_per_layer_wave() const {
  std::lock_guard<std::mutex> guard{mutex_};
  if (executions_.empty())
    return 0.0;
  double total = 0.0;
  for (const auto& [key, count] : executions_)
    total += double(count);
  return total / double(executions_.size());
}

}  // namespace moert::actors
