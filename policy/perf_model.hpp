#pragma once

// α-β cost models of FinDEP (../shared/reference/findep.md §4): each primitive is a straight line
// t = α + β·x fitted by least squares, and the per-task times of Eq. 10–11 are built from them.
//
// Units, everywhere in policy/: time in milliseconds. α in ms; β in ms per MAC for GEMM and
// attention (x = multiply-accumulates), in ms per byte for communication (x = bytes sent to one
// expert-group device). Throughput is in tokens per second.

#include "core/error.hpp"
#include "policy/model_shape.hpp"

#include <cstddef>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace moert::policy {

// t = alpha + beta·x; r2 is the coefficient of determination of the fit (1 for given constants).
struct linear_fit {
  double alpha = 0.0;
  double beta = 0.0;
  double r2 = 1.0;

  double operator()(double x) const { return alpha + beta * x; }
};

// Least squares over (x[i], y[i]). Needs at least two distinct x; the error says which rule broke.
[[nodiscard]] result<linear_fit> fit_linear(std::span<const double> x, std::span<const double> y);

// The least-squares line with α ≥ 0: the free fit, or the best line through the origin when the
// free intercept is negative. Calibration uses it because a negative startup time makes small
// tasks take negative time and voids Theorems 1–3, which need α, β ≥ 0.
[[nodiscard]] result<linear_fit> fit_linear_nonnegative(std::span<const double> x, std::span<const double> y);

// A2E (and E2A, assumed equal) fitted for one (ag, eg) pair.
struct comm_fit {
  std::size_t ag = 0;
  std::size_t eg = 0;
  linear_fit fit;
};

// The constants of one machine type (configs/testbeds/*.json).
// The grouped/dense crossover of one device's expert GEMMs (EPS-MoE, amoe-eps.md §3.5), measured
// on the GPU by `moert calibrate --backend cuda`: an expert with at least dense_min_rows rows
// runs as its own dense GEMM, fewer share one grouped GEMM. dense_min_rows absent: dense never
// won on the calibration's grid, so every expert runs grouped.
struct expert_gemm_crossover {
  std::optional<std::size_t> dense_min_rows;
  std::string source;  // what it was measured on: GPU, shapes, type, grid
};

struct testbed {
  std::string name;
  std::string notes;  // provenance, units and corrections; carried through JSON unchanged
  linear_fit gemm;       // one GEMM, x = m·k·n MACs
  linear_fit attention;  // attention core QKᵀ + PV, x = MACs
  // One whole SwiGLU expert (gate, up, down, activation), x = MACs of one of its three GEMMs.
  // Absent: derived from gemm as α = 3·α_gm, β = 3·β_gm (Eq. 2).
  std::optional<linear_fit> shared_expert;
  std::vector<comm_fit> comm;               // per (ag, eg) pair
  std::optional<linear_fit> comm_default;   // for pairs not in `comm`; assumed, not fitted
  // Threads per task the lines were measured with (`moert calibrate --threads`): placement.hpp
  // scales compute to devices of other widths from it. 1 when the file does not say.
  std::size_t threads = 1;
  double device_memory_bytes = 0.0;         // per device
  double reserved_bytes = 0.0;              // runtime, allocator and workspace headroom per device
  std::optional<expert_gemm_crossover> expert_gemm;  // GPU testbeds only
};

// The A2E fit for (ag, eg): the exact pair, else comm_default, else an error naming the pair.
[[nodiscard]] result<linear_fit> comm_model(const testbed& bed, std::size_t ag, std::size_t eg);

// The four task-time lines of Eq. 10–11 for one (model, testbed, ag, eg, S):
// attention and shared are linear in m_a (samples per micro-batch), expert and a2e in m_e
// (tokens per chunk per expert). E2A takes the same time as A2E (findep.md §2).
//
// The expert term keeps Eq. 3's factor 3 that the printed Eq. 11 drops (findep.md §4.2):
// α_e = 3·(E/eg)·α_gm, β_e = 3·(E/eg)·β_gm·M·H, with E/eg rounded up (the busiest device).
// Attention uses one GEMM per weight (MLA per findep.md §4.1, GQA with its real KV width).
struct task_models {
  linear_fit attention;
  linear_fit shared;
  linear_fit expert;
  linear_fit a2e;
  // Token conservation (findep.md §3.1): m_e = tokens_per_sample · m_a / r2 with
  // tokens_per_sample = ag·top_k·S/E.
  double tokens_per_sample = 0.0;
};

[[nodiscard]] result<task_models> make_task_models(const model_shape& shape, const testbed& bed,
                                                   std::size_t ag, std::size_t eg,
                                                   std::size_t seq_len);

// Durations of one micro-batch's AG tasks and one chunk's link/expert tasks, in ms.
struct stage_times {
  double attention = 0.0;  // t_a(m_a)
  double shared = 0.0;     // t_s(m_a)
  double a2e = 0.0;        // t_a2e(m_e)
  double expert = 0.0;     // t_e(m_e)
  double e2a = 0.0;        // t_e2a(m_e) = t_a2e(m_e) in the FinDEP model
};

stage_times stage_times_for(const task_models& models, double m_a, double m_e);

}  // namespace moert::policy
