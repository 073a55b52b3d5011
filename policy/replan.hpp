#pragma once

// When the policy actor re-solves the FinDEP plan online (findep.md §9, "Online use"): the
// observed workload shape (sequences in flight, mean context length) must stay past a relative
// threshold from the shape the current plan was solved for, for `patience` observations in a
// row. The band and the patience are the hysteresis: small drifts and one-step spikes keep the
// plan, so a shard never flips between plans every step.
//
// Pure; the caller passes every observation and says when it solved.

#include "policy/findep.hpp"
#include "policy/plan.hpp"

#include <cstddef>
#include <optional>

namespace moert::policy {

struct workload_shape {
  std::size_t batch = 0;    // sequences in flight over all attention devices
  std::size_t seq_len = 0;  // mean tokens per sequence (context)
  bool operator==(const workload_shape&) const = default;
};

struct replan_params {
  double threshold = 0.5;    // relative distance that counts as "moved" (0.5 = ±50 %)
  std::size_t patience = 2;  // consecutive moved observations before re-solving
};

class replan_trigger {
public:
  explicit replan_trigger(replan_params params = {}) : params_(params) {}

  // True when a new plan should be solved for `observed`. The first non-empty observation
  // always asks for one.
  bool observe(workload_shape observed);
  // Records that a plan was solved for `shape`: the new centre of the band.
  void solved(workload_shape shape);

  const std::optional<workload_shape>& anchor() const { return anchor_; }

private:
  replan_params params_;
  std::optional<workload_shape> anchor_;
  std::size_t moved_in_a_row_ = 0;
};

// The runtime's form of a solver plan: r1 micro-batches of m_a sequences, r2 chunks, the order
// (PPPipe when the plan is the PPPipe baseline).
execution_plan to_execution_plan(const plan& solved);

}  // namespace moert::policy
