#pragma once

// Discrete-event simulators (../shared/reference/findep.md §3, §12.1; amoe-eps.md §2, §5).
//
// 1. simulate_graph: one iteration of the per-layer task graph on four exclusive,
//    non-preemptive, strictly in-order resources (AG compute, A2E link, EG compute, E2A link)
//    for FinDEP (ASAS or AASS), PPPipe and fully synchronous execution. The reference against
//    which the closed forms and the solver are tested.
// 2. simulate_async: AMoE-style asynchronous expert parallelism with per-(layer, expert)
//    μ-queues drained whole by defrag, MTFS or FLFS (policy/defrag.hpp) under skewed expert
//    load, and a barrier-synchronous EP baseline on the same devices and costs.
//
// Units: ms. Pure functions of their arguments (seeded randomness only); no clocks, no I/O.

#include "core/error.hpp"
#include "policy/defrag.hpp"
#include "policy/findep.hpp"
#include "policy/perf_model.hpp"

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moert::policy {

// -- task graph --------------------------------------------------------------------------------

enum class graph_policy {
  findep,       // A2E waits for attention only; order ASAS or AASS
  pppipe,       // A2E also waits for the shared expert (use r2 = 1)
  synchronous,  // PPPipe edges plus a barrier: micro-batch i+1 starts after i's last E2A (ASAS)
};

std::string_view to_string(graph_policy policy);

enum class resource : std::uint8_t { ag, a2e, eg, e2a };
enum class task_kind : std::uint8_t { attention, shared, a2e, expert, e2a };
inline constexpr std::size_t num_resources = 4;

std::string_view to_string(resource r);
std::string_view to_string(task_kind kind);

struct graph_config {
  stage_times times;  // per micro-batch (A, S) and per chunk (A2E, expert, E2A)
  std::size_t num_layers = 1;
  std::size_t r1 = 1;
  std::size_t r2 = 1;
  segment_order order = segment_order::asas;
  graph_policy policy = graph_policy::findep;
  bool record_tasks = false;  // keep every task's interval (for Gantt charts)
};

struct task_record {
  resource where;
  task_kind kind;
  std::uint32_t layer;
  std::uint32_t micro_batch;
  std::uint32_t chunk;
  double start;
  double end;
};

struct graph_report {
  double makespan = 0.0;
  std::array<double, num_resources> busy{};  // per resource, indexed by resource
  std::array<double, num_resources> idle{};  // makespan − busy
  std::vector<task_record> tasks;            // when record_tasks
};

[[nodiscard]] result<graph_report> simulate_graph(const graph_config& config);

// Evaluates a plan of a FinDEP instance in the DES. `synchronous` runs the r1·m_a samples as
// one micro-batch with r2 = 1 (naive DEP); `pppipe` forces r2 = 1. m_e is kept real.
[[nodiscard]] result<graph_report> simulate_plan(const findep_instance& inst, std::size_t m_a,
                                                 std::size_t r1, std::size_t r2, segment_order order,
                                                 graph_policy policy, bool record_tasks = false);

// -- asynchronous μ-queues under skew ------------------------------------------------------------

enum class skew_kind { uniform, zipf, exponential, explicit_weights };

struct expert_skew {
  skew_kind kind = skew_kind::uniform;
  double param = 0.0;            // zipf: s; exponential: λ (p ∝ exp(−λ·rank))
  std::vector<double> weights;   // explicit_weights: one per expert, any positive scale
};

// Parses "uniform", "zipf:1.0", "exp:0.5" or "weights:4,2,1,1".
[[nodiscard]] result<expert_skew> parse_skew(std::string_view text);

// Routing probability per expert (sums to 1). Errors name the bad parameter.
[[nodiscard]] result<std::vector<double>> expert_probabilities(const expert_skew& skew,
                                                               std::size_t num_experts);

// Decode with attention (and gating) on attention devices (data parallel, each owning its
// sequences), routed experts on expert devices (num_experts/num_expert_devices each).
struct async_config {
  std::size_t num_attention_devices = 4;
  std::size_t num_expert_devices = 4;
  std::size_t num_layers = 32;
  std::size_t num_experts = 8;
  std::size_t top_k = 1;
  std::size_t sequences_per_device = 64;  // each has one token in flight
  std::size_t num_iterations = 8;         // decode steps per sequence
  linear_fit attention;                   // one attention-layer step, x = tokens in the batch
  linear_fit expert;                      // one expert's FFN, x = tokens in its batch
  linear_fit transfer;                    // one A2E or E2A message, x = tokens in it
  expert_skew skew;
  bool reshuffle_per_layer = true;  // hot experts differ per layer (a fixed random rank per layer)
  // Sequences start at seeded random layers, as in steady-state continuous decode, instead of as
  // one wave at layer 0. Each still runs num_iterations × num_layers layer steps.
  bool staggered_start = true;
  queue_policy policy = queue_policy::defrag;
  defrag_params params;
  std::uint64_t seed = 1;
  bool record_tasks = false;
};

struct device_record {
  std::uint32_t device;  // attention devices first, then expert devices
  bool expert;
  std::uint32_t layer;
  std::uint32_t tokens;
  double start;
  double end;
};

struct async_report {
  double makespan = 0.0;
  double throughput = 0.0;           // tokens per second: layer steps / num_layers / makespan
  std::size_t tokens = 0;            // sequences × iterations
  double attention_idle = 0.0;       // mean idle fraction of attention devices
  double expert_idle = 0.0;          // mean idle fraction of expert devices
  std::size_t expert_executions = 0;
  double mean_expert_batch = 0.0;    // tokens per expert execution
  // Expert executions per (layer, expert, decode iteration): 1 when every decode step reaches
  // each expert queue as one batch, above 1 when waves split into fragments (amoe-eps.md §2.6).
  double fragmentation = 0.0;
  std::vector<device_record> tasks;  // when record_tasks
};

[[nodiscard]] result<async_report> simulate_async(const async_config& config);

// Decode-step cost lines for simulate_async from a model shape and a testbed (findep.md §2: decode
// attention is linear in batch × context): attention per token = one GEMM per projection plus
// QKᵀ/PV over `context` keys; expert per token = 3 GEMMs of M×H; a transfer per token = M·dtype
// bytes on the (attention devices, expert devices) link fit. Fills attention, expert, transfer,
// num_layers (MoE layers), num_experts and top_k; the rest of `base` is kept.
[[nodiscard]] result<async_config> with_decode_costs(async_config base, const model_shape& shape,
                                                     const testbed& bed, std::size_t context);

// The barrier-synchronous EP baseline with the same devices, costs and routing draws: per layer
// all attention devices, then A2E, then every expert device runs its local experts one after
// another, then E2A; the slowest device of each phase sets the pace.
[[nodiscard]] result<async_report> simulate_sync_ep(const async_config& config);

}  // namespace moert::policy
