#pragma once

// FinDEP's schedule model and solver (../shared/reference/findep.md §6–9).
//
// Closed forms for the makespan of one iteration (T layers, r1 micro-batches of m_a samples per
// AG device, r2 chunks per micro-batch), the memory model that bounds r1 for each m_a, and
// Algorithm 1 with a brute-force reference. Units: ms (perf_model.hpp), bytes, tokens per second.
// Pure functions of their arguments; no clocks, no I/O.

#include "core/error.hpp"
#include "policy/model_shape.hpp"
#include "policy/perf_model.hpp"
#include "policy/plan.hpp"

#include <cstddef>
#include <optional>
#include <string_view>

namespace moert::policy {

// The attention-group order is policy::segment_order (plan.hpp): the solver uses ASAS and
// AASS; PPPipe plans are marked by plan::pppipe.

// -- closed forms (findep.md §6.3, §6.2, §7) ---------------------------------------------------

// Corrected ASAS makespan: (T−1)·max(G, r1·F) + (r1−1)·F + max(X, G). Equals the DES exactly.
double asas_makespan(const stage_times& st, std::size_t num_layers, std::size_t r1, std::size_t r2);

// PPPipe (MegaScale-Infer ping-pong, r2 = 1, A2E after the shared expert):
// (T−1)·max(G_pp, r1·F) + (r1−1)·F + G_pp. Equals the DES exactly.
double pppipe_makespan(const stage_times& st, std::size_t num_layers, std::size_t r1);

// The paper's Eq. 13 denominator as printed, which counts (r2−1)·Y twice. For comparison only:
// it overestimates whenever r2 > 1.
double printed_eq13_makespan(const stage_times& st, std::size_t num_layers, std::size_t r1,
                             std::size_t r2);

// Exact makespan of the in-order task graph by a max-plus recurrence in O(T·r1) (less once the
// layers reach a steady shift). The A2E → expert → E2A chunks form a three-stage flow shop of
// identical jobs whose last completion is max over jobs k of release(k) + t_a2e + t_e + t_e2a +
// (n−k)·Y. AASS has no closed form (findep.md §6.4); this is what the solver uses for it.
// `a2e_after_shared` adds PPPipe's edge (A2E waits for the shared expert).
double graph_makespan(const stage_times& st, std::size_t num_layers, std::size_t r1, std::size_t r2,
                      segment_order order, bool a2e_after_shared = false);

// -- memory model (findep.md §9, getMaxR1; inferred by the reference, made explicit here) -------

// Bytes per device. An AG device holds its weights, the resident state of every sample of its
// mini-batch (r1·m_a samples) and the workspace of the micro-batch it computes (m_a samples);
// an EG device holds its experts and double-buffered A2E/E2A buffers for one micro-batch.
struct memory_model {
  double device_bytes = 0.0;              // usable: capacity − reserved
  double ag_weight_bytes = 0.0;           // T·(attention + shared + router + norms) + embedding + head
  double ag_resident_per_sample = 0.0;    // T·S·kv_bytes_per_token_per_layer + S·M·dtype
  double ag_workspace_per_sample = 0.0;   // S·dtype·(2M + attention outputs + 2·top_k·M + 3·N_shared·H_shared)
  double eg_weight_bytes = 0.0;           // T·ceil(E/eg)·3·M·H·dtype
  double eg_buffer_per_sample = 0.0;      // 2·2·(ag·top_k·S/eg)·M·dtype
  std::size_t max_samples = 0;            // cap on r1·m_a per AG device from the batch; 0 = none
};

// num_layers counts the MoE layers modelled (the paper's reduced counts, e.g. 8 on testbed A).
// batch = samples in the global mini-batch (split over ag devices); 0 = bounded by memory only.
[[nodiscard]] result<memory_model> make_memory_model(const model_shape& shape, const testbed& bed,
                                                     std::size_t ag, std::size_t eg,
                                                     std::size_t seq_len, std::size_t num_layers,
                                                     std::size_t batch);

// getMaxR1: the largest r1 with r1·m_a samples resident; 0 when m_a itself does not fit.
std::size_t max_r1(const memory_model& mem, std::size_t m_a);
// The largest m_a with max_r1 ≥ 1 (0 when nothing fits).
std::size_t max_micro_batch(const memory_model& mem);

// -- solver (findep.md §9) ---------------------------------------------------------------------

enum class objective {
  corrected,     // corrected ASAS closed form; AASS by graph_makespan
  printed_eq13,  // the paper's printed Eq. 13, ASAS only (it has no AASS form); for comparison
};

struct solver_options {
  std::size_t r2_max = 64;  // chunks per micro-batch; also capped so that m_e ≥ 1 token
  objective goal = objective::corrected;
  bool aass = true;  // also search AASS (ASAS is always searched)
};

// One FinDEP problem: the task-time lines, the memory bound and the iteration size.
struct findep_instance {
  task_models tasks;
  memory_model memory;
  std::size_t num_layers = 0;
  std::size_t ag = 0;
  std::size_t seq_len = 0;
};

[[nodiscard]] result<findep_instance> make_instance(const model_shape& shape, const testbed& bed,
                                                    std::size_t ag, std::size_t eg,
                                                    std::size_t seq_len, std::size_t num_layers,
                                                    std::size_t batch);

struct plan {
  std::size_t m_a = 0;
  std::size_t r1 = 0;
  std::size_t r2 = 1;
  double m_e = 0.0;  // tokens per chunk per expert, real (round up to dispatch)
  segment_order order = segment_order::asas;
  bool pppipe = false;
  double makespan_ms = 0.0;  // as predicted by the objective that chose the plan
  double throughput = 0.0;   // tokens per second: r1·m_a·ag·S / makespan
};

// m_e for (m_a, r2): tokens_per_sample·m_a/r2.
double chunk_tokens(const findep_instance& inst, std::size_t m_a, std::size_t r2);
// The largest r2 allowed for m_a: min(r2_max, ⌊tokens_per_sample·m_a⌋), at least 1.
std::size_t max_r2(const findep_instance& inst, std::size_t m_a, const solver_options& opt);
// Tokens per second of an iteration of r1·m_a samples per AG device taking makespan_ms.
double throughput(const findep_instance& inst, std::size_t m_a, std::size_t r1, double makespan_ms);

// Algorithm 1: the memory frontier (one m_a per distinct r1), both orders, r2 by the unimodal
// scan (Theorem 4: stop at the first r2 that does not improve). Errors: "infeasible: …" naming
// the bytes needed and available.
[[nodiscard]] result<plan> solve(const findep_instance& inst, const solver_options& opt = {});

// Reference: every (m_a, r1 ≤ max_r1(m_a), r2 ≤ max_r2, order), each evaluated by the
// discrete-event simulator. Slow; for tests and benches.
[[nodiscard]] result<plan> solve_brute_force(const findep_instance& inst, const solver_options& opt = {});

// The best PPPipe plan over every feasible (m_a, r1), by its closed form.
[[nodiscard]] result<plan> solve_pppipe(const findep_instance& inst);

}  // namespace moert::policy
