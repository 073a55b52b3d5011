#include "policy/findep.hpp"

#include "policy/simulator.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

namespace moert::policy {

namespace {

// Period of the A2E → expert → E2A chunk pipeline.
double chunk_period(const stage_times& st) {
  return std::max({st.a2e, st.expert, st.e2a});
}

double chunk_latency(const stage_times& st) {
  return st.a2e + st.expert + st.e2a;
}

}  // namespace

double asas_makespan(const stage_times& st, std::size_t num_layers, std::size_t r1, std::size_t r2) {
  double x = st.attention + st.shared;
  double y = chunk_period(st);
  double f = std::max(x, double(r2) * y);
  double g = st.attention + chunk_latency(st) + double(r2 - 1) * y;
  return double(num_layers - 1) * std::max(g, double(r1) * f) + double(r1 - 1) * f + std::max(x, g);
}

double pppipe_makespan(const stage_times& st, std::size_t num_layers, std::size_t r1) {
  double x = st.attention + st.shared;
  double f = std::max(x, chunk_period(st));
  double g = x + chunk_latency(st);
  return double(num_layers - 1) * std::max(g, double(r1) * f) + double(r1 - 1) * f + g;
}

double printed_eq13_makespan(const stage_times& st, std::size_t num_layers, std::size_t r1,
                             std::size_t r2) {
  double x = st.attention + st.shared;
  double y = chunk_period(st);
  double f = std::max(x, double(r2) * y);
  double g = st.attention + chunk_latency(st) + double(r2 - 1) * y;
  return double(num_layers - 1) * std::max(g, double(r1) * f) + std::max(x, g) + double(r2 - 1) * y +
         double(r1 - 1) * f;
}

double graph_makespan(const stage_times& st, std::size_t num_layers, std::size_t r1, std::size_t r2,
                      segment_order order, bool a2e_after_shared) {
  double y = chunk_period(st);
  double group_tail = chunk_latency(st) + double(r2 - 1) * y;  // release → last E2A of a micro-batch
  double group_span = double(r2) * y;
  // State carried between layers: when the AG is free, when each micro-batch's last E2A ends
  // (next-layer attention waits for it), and when the flow shop's last E2A ends.
  double ag_free = 0.0;
  double last_e2a = -std::numeric_limits<double>::infinity();
  std::vector<double> done(r1, 0.0), prev_done(r1), a_end(r1), s_end(r1);
  for (std::size_t t = 0; t < num_layers; ++t) {
    double prev_ag_free = ag_free, prev_last = last_e2a;
    prev_done = done;
    for (std::size_t i = 0; i < r1; ++i) {
      a_end[i] = std::max(ag_free, done[i]) + st.attention;
      ag_free = a_end[i];
      if (order == segment_order::asas) {
        s_end[i] = ag_free + st.shared;
        ag_free = s_end[i];
      }
    }
    if (order == segment_order::aass)
      for (std::size_t i = 0; i < r1; ++i) {
        s_end[i] = ag_free + st.shared;
        ag_free = s_end[i];
      }
    for (std::size_t i = 0; i < r1; ++i) {
      double release = a2e_after_shared ? s_end[i] : a_end[i];
      last_e2a = std::max(last_e2a + group_span, release + group_tail);
      done[i] = last_e2a;
    }
    // Max-plus dynamics commute with a uniform shift: once a layer repeats the previous one
    // shifted by δ, every later layer does too.
    if (t > 0 && t + 1 < num_layers) {
      double shift = ag_free - prev_ag_free;
      bool steady = last_e2a - prev_last == shift;
      for (std::size_t i = 0; steady && i < r1; ++i)
        steady = done[i] - prev_done[i] == shift;
      if (steady)
        return std::max(ag_free, last_e2a) + double(num_layers - 1 - t) * shift;
    }
  }
  return std::max(ag_free, last_e2a);
}

// -- memory ------------------------------------------------------------------------------------

result<memory_model> make_memory_model(const model_shape& shape, const testbed& bed, std::size_t ag,
                                       std::size_t eg, std::size_t seq_len, std::size_t num_layers,
                                       std::size_t batch) {
  MOERT_TRY(validate(shape));
  if (ag == 0 || eg == 0 || seq_len == 0 || num_layers == 0)
    return make_error(error_code::invalid_argument, "ag, eg, seq_len and num_layers must be positive");
  if (bed.device_memory_bytes <= bed.reserved_bytes)
    return make_error(error_code::invalid_config,
                      "testbed '" + bed.name + "': 'device_memory_gib' must exceed 'reserved_gib'");
  if (batch > 0 && batch < ag)
    return make_error(error_code::invalid_argument,
                      "batch " + std::to_string(batch) + " is smaller than ag " + std::to_string(ag));
  double dtype = double(shape.dtype_bytes);
  double m = double(shape.hidden);
  double s = double(seq_len);
  double layers = double(num_layers);
  double shared = double(shape.num_shared) * 3 * m * double(shape.shared_intermediate);
  double per_layer = double(attention_params(shape)) + shared + double(shape.num_experts) * m + 2 * m;
  double attention_outputs = 0.0;
  for (const gemm_dims& g : attention_gemms(shape))
    attention_outputs += double(g.n);

  memory_model mem;
  mem.device_bytes = bed.device_memory_bytes - bed.reserved_bytes;
  mem.ag_weight_bytes = (layers * per_layer + 2 * double(shape.vocab) * m) * dtype;
  mem.ag_resident_per_sample = layers * s * double(kv_bytes_per_token_per_layer(shape)) + s * m * dtype;
  mem.ag_workspace_per_sample =
      s * dtype *
      (2 * m + attention_outputs + 2 * double(shape.top_k) * m +
       3 * double(shape.num_shared) * double(shape.shared_intermediate));
  double experts_per_device = double((shape.num_experts + eg - 1) / eg);
  mem.eg_weight_bytes = layers * experts_per_device * 3 * m * double(shape.expert_intermediate) * dtype;
  mem.eg_buffer_per_sample = 4 * (double(ag) * double(shape.top_k) * s / double(eg)) * m * dtype;
  mem.max_samples = batch / ag;
  return mem;
}

std::size_t max_r1(const memory_model& mem, std::size_t m_a) {
  double ma = double(m_a);
  if (m_a == 0 || mem.eg_weight_bytes + ma * mem.eg_buffer_per_sample > mem.device_bytes)
    return 0;
  double free = mem.device_bytes - mem.ag_weight_bytes - ma * mem.ag_workspace_per_sample;
  if (free < ma * mem.ag_resident_per_sample)
    return 0;
  double r1 = std::floor(free / (ma * mem.ag_resident_per_sample));
  if (mem.max_samples > 0)
    r1 = std::min(r1, double(mem.max_samples / m_a));
  return std::size_t(std::min(r1, 1e12));
}

std::size_t max_micro_batch(const memory_model& mem) {
  if (max_r1(mem, 1) == 0)
    return 0;
  std::size_t lo = 1, hi = 2;  // max_r1(lo) ≥ 1; find hi with max_r1(hi) == 0
  while (max_r1(mem, hi) > 0)
    hi *= 2;
  while (hi - lo > 1) {
    std::size_t mid = lo + (hi - lo) / 2;
    (max_r1(mem, mid) > 0 ? lo : hi) = mid;
  }
  return lo;
}

// -- solver ------------------------------------------------------------------------------------

result<findep_instance> make_instance(const model_shape& shape, const testbed& bed, std::size_t ag,
                                      std::size_t eg, std::size_t seq_len, std::size_t num_layers,
                                      std::size_t batch) {
  auto tasks = make_task_models(shape, bed, ag, eg, seq_len);
  if (!tasks)
    return tasks.err();
  auto memory = make_memory_model(shape, bed, ag, eg, seq_len, num_layers, batch);
  if (!memory)
    return memory.err();
  return findep_instance{*tasks, *memory, num_layers, ag, seq_len};
}

double chunk_tokens(const findep_instance& inst, std::size_t m_a, std::size_t r2) {
  return inst.tasks.tokens_per_sample * double(m_a) / double(r2);
}

std::size_t max_r2(const findep_instance& inst, std::size_t m_a, const solver_options& opt) {
  double whole_tokens = std::floor(inst.tasks.tokens_per_sample * double(m_a));
  return std::size_t(std::max(1.0, std::min(double(opt.r2_max), whole_tokens)));
}

double throughput(const findep_instance& inst, std::size_t m_a, std::size_t r1, double makespan_ms) {
  return double(r1 * m_a * inst.ag * inst.seq_len) / makespan_ms * 1e3;
}

namespace {

std::string gib(double bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f", bytes / double(1ull << 30));
  return text;
}

error infeasible(const memory_model& mem) {
  double ag_need = mem.ag_weight_bytes + mem.ag_resident_per_sample + mem.ag_workspace_per_sample;
  double eg_need = mem.eg_weight_bytes + mem.eg_buffer_per_sample;
  if (ag_need > mem.device_bytes)
    return make_error(error_code::invalid_argument,
                      "infeasible: needs " + gib(ag_need) + " GiB per attention-group device (weights " +
                          gib(mem.ag_weight_bytes) + " GiB + one sample " + gib(ag_need - mem.ag_weight_bytes) +
                          " GiB), has " + gib(mem.device_bytes) + " GiB");
  return make_error(error_code::invalid_argument,
                    "infeasible: needs " + gib(eg_need) + " GiB per expert-group device (experts " +
                        gib(mem.eg_weight_bytes) + " GiB + buffers " + gib(mem.eg_buffer_per_sample) +
                        " GiB), has " + gib(mem.device_bytes) + " GiB");
}

double model_makespan(const findep_instance& inst, std::size_t m_a, std::size_t r1, std::size_t r2,
                      segment_order order, objective goal) {
  stage_times st = stage_times_for(inst.tasks, double(m_a), chunk_tokens(inst, m_a, r2));
  if (goal == objective::printed_eq13)
    return printed_eq13_makespan(st, inst.num_layers, r1, r2);
  if (order == segment_order::asas)
    return asas_makespan(st, inst.num_layers, r1, r2);
  return graph_makespan(st, inst.num_layers, r1, r2, order);
}

plan make_plan(const findep_instance& inst, std::size_t m_a, std::size_t r1, std::size_t r2,
               segment_order order, double makespan) {
  return plan{m_a, r1, r2, chunk_tokens(inst, m_a, r2), order, false, makespan,
              throughput(inst, m_a, r1, makespan)};
}

}  // namespace

result<plan> solve(const findep_instance& inst, const solver_options& opt) {
  std::size_t top = max_micro_batch(inst.memory);
  if (top == 0)
    return infeasible(inst.memory);
  std::optional<plan> best;
  std::size_t r1_prev = 0;
  for (std::size_t m_a = top; m_a >= 1; --m_a) {
    std::size_t r1 = max_r1(inst.memory, m_a);
    // Theorem 1: the largest m_a for each r1 is the best for it; Theorem 3: smaller r1 for this
    // m_a are dominated. So one point per distinct r1 (the memory frontier).
    if (r1 == 0 || r1 == r1_prev)
      continue;
    r1_prev = r1;
    for (segment_order order : {segment_order::asas, segment_order::aass}) {
      if (order == segment_order::aass && (!opt.aass || opt.goal == objective::printed_eq13))
        continue;
      // Theorem 4: the makespan is convex in 1/r2, so it never improves after it first stops.
      std::size_t r2_top = max_r2(inst, m_a, opt);
      std::size_t r2 = 1;
      double makespan = model_makespan(inst, m_a, r1, 1, order, opt.goal);
      for (std::size_t next = 2; next <= r2_top; ++next) {
        double candidate = model_makespan(inst, m_a, r1, next, order, opt.goal);
        if (candidate >= makespan)
          break;
        r2 = next;
        makespan = candidate;
      }
      plan p = make_plan(inst, m_a, r1, r2, order, makespan);
      if (!best || p.throughput > best->throughput)
        best = p;
    }
  }
  return *best;
}

result<plan> solve_brute_force(const findep_instance& inst, const solver_options& opt) {
  std::size_t top = max_micro_batch(inst.memory);
  if (top == 0)
    return infeasible(inst.memory);
  std::optional<plan> best;
  for (std::size_t m_a = 1; m_a <= top; ++m_a)
    for (std::size_t r1 = 1; r1 <= max_r1(inst.memory, m_a); ++r1)
      for (std::size_t r2 = 1; r2 <= max_r2(inst, m_a, opt); ++r2)
        for (segment_order order : {segment_order::asas, segment_order::aass}) {
          if (order == segment_order::aass && !opt.aass)
            continue;
          auto report = simulate_plan(inst, m_a, r1, r2, order, graph_policy::findep);
          if (!report)
            return report.err();
          plan p = make_plan(inst, m_a, r1, r2, order, report->makespan);
          if (!best || p.throughput > best->throughput)
            best = p;
        }
  return *best;
}

result<plan> solve_pppipe(const findep_instance& inst) {
  std::size_t top = max_micro_batch(inst.memory);
  if (top == 0)
    return infeasible(inst.memory);
  std::optional<plan> best;
  // PPPipe's throughput is non-decreasing in r1 (same argument as Theorem 3), so only the
  // largest r1 of each m_a is evaluated; every m_a is.
  for (std::size_t m_a = 1; m_a <= top; ++m_a) {
    std::size_t r1 = max_r1(inst.memory, m_a);
    stage_times st = stage_times_for(inst.tasks, double(m_a), chunk_tokens(inst, m_a, 1));
    plan p = make_plan(inst, m_a, r1, 1, segment_order::asas, pppipe_makespan(st, inst.num_layers, r1));
    p.pppipe = true;
    if (!best || p.throughput > best->throughput)
      best = p;
  }
  return *best;
}

}  // namespace moert::policy
