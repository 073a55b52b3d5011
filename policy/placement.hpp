#pragma once

// Where attention and experts run on one machine: the engine's default placement (issue [P]
// part 3). Candidates are every disaggregated split of the machine's cores into ag attention
// + eg expert devices (FinDEP's solver gives each its best plan) and the co-located one: one
// device with every core that runs attention, attention-side FFN and expert steps in turn.
// The candidate with the highest predicted decode throughput wins, co-located on a tie (it
// moves no rows and has no pipeline to fill).
//
// Cost model: the testbed's α-β lines (perf_model.hpp), measured with `testbed::threads`
// threads per task, are scaled to a device of t threads by assuming compute scales linearly
// with threads: β·threads/t, α unchanged (a task's start-up does not shrink with threads).
// Communication lines are not scaled. Pure functions; units as in perf_model.hpp (ms).

#include "core/error.hpp"
#include "policy/findep.hpp"
#include "policy/model_shape.hpp"
#include "policy/perf_model.hpp"
#include "policy/plan.hpp"

#include <cstddef>
#include <string>
#include <vector>

namespace moert::policy {

// The workload a placement is judged on: `batch` sequences decoding one token each.
struct placement_workload {
  std::size_t batch = 16;
  std::size_t seq_len = 1;  // tokens per sequence per step (1: decode)
};

struct placement_candidate {
  bool colocated = false;
  std::size_t ag = 1;
  std::size_t eg = 1;
  std::size_t threads_per_device = 1;
  execution_plan plan;
  double makespan_ms = 0.0;  // one step of the workload, all MoE layers
  double throughput = 0.0;   // tokens per second
};

struct placement_choice {
  placement_candidate chosen;
  std::vector<placement_candidate> candidates;  // every one evaluated, co-located first
  std::string reason;  // "co-located on 2 cores: 123 tok/s predicted vs 1 + 1 ... 80 tok/s"
};

// `bed` with its compute lines scaled from bed.threads to `threads` threads.
testbed scaled_to_threads(const testbed& bed, std::size_t threads);

// Predicted step time of the co-located device with `cores` threads: every MoE layer's
// attention, attention-side FFN and experts one after another, nothing moved.
[[nodiscard]] result<double> colocated_makespan(const model_shape& shape, const testbed& bed, std::size_t cores,
                                                const placement_workload& work);

// The best placement of `cores` cores. Errors name the bad argument (cores 0, an invalid
// shape, a workload of 0 sequences); a disaggregated split the solver finds infeasible is
// skipped, not an error.
[[nodiscard]] result<placement_choice> choose_placement(const model_shape& shape, const testbed& bed,
                                                        std::size_t cores, const placement_workload& work = {});

}  // namespace moert::policy
