#include "policy/placement.hpp"

#include <cstdio>

namespace moert::policy {

testbed scaled_to_threads(const testbed& bed, std::size_t threads) {
  testbed out = bed;
  double factor = double(bed.threads) / double(std::max<std::size_t>(threads, 1));
  out.gemm.beta *= factor;
  out.attention.beta *= factor;
  if (out.shared_expert)
    out.shared_expert->beta *= factor;
  out.threads = threads;
  return out;
}

result<double> colocated_makespan(const model_shape& shape, const testbed& bed, std::size_t cores,
                                  const placement_workload& work) {
  if (cores == 0)
    return make_error(error_code::invalid_argument, "placement: cores must be at least 1");
  if (work.batch == 0 || work.seq_len == 0)
    return make_error(error_code::invalid_argument, "placement: the workload needs at least one sequence and token");
  auto tasks = make_task_models(shape, scaled_to_threads(bed, cores), 1, 1, work.seq_len);
  if (!tasks)
    return tasks.err();
  double m_a = double(work.batch);
  double m_e = tasks->tokens_per_sample * m_a;
  double layer = tasks->attention(m_a) + tasks->shared(m_a) + tasks->expert(m_e);
  return double(shape.num_moe_layers()) * layer;
}

result<placement_choice> choose_placement(const model_shape& shape, const testbed& bed, std::size_t cores,
                                          const placement_workload& work) {
  auto colocated_ms = colocated_makespan(shape, bed, cores, work);
  if (!colocated_ms)
    return colocated_ms.err();
  double tokens = double(work.batch * work.seq_len);
  placement_choice out;
  placement_candidate colocated;
  colocated.colocated = true;
  colocated.threads_per_device = cores;
  colocated.makespan_ms = *colocated_ms;
  colocated.throughput = tokens / *colocated_ms * 1e3;
  out.candidates.push_back(colocated);
  out.chosen = colocated;

  // Disaggregated: d devices of cores / d threads each, every split into ag + eg.
  for (std::size_t d = 2; d <= cores; ++d) {
    std::size_t threads = cores / d;
    testbed narrow = scaled_to_threads(bed, threads);
    for (std::size_t ag = 1; ag < d; ++ag) {
      std::size_t eg = d - ag;
      if (work.batch < ag)
        continue;  // a shard without a sequence is no split
      auto inst = make_instance(shape, narrow, ag, eg, work.seq_len, shape.num_moe_layers(), work.batch);
      if (!inst)
        continue;
      auto solved = solve(*inst);
      if (!solved)
        continue;
      placement_candidate c;
      c.ag = ag;
      c.eg = eg;
      c.threads_per_device = threads;
      // r1 micro-batches without a fixed m_a: the batch a shard holds varies between steps.
      c.plan = {solved->r1, 0, solved->pppipe ? 1 : solved->r2,
                solved->pppipe ? segment_order::pppipe : solved->order};
      c.makespan_ms = solved->makespan_ms;
      c.throughput = solved->throughput;
      out.candidates.push_back(c);
      if (c.throughput > out.chosen.throughput)
        out.chosen = c;
    }
  }

  const placement_candidate& best_split = [&]() -> const placement_candidate& {
    const placement_candidate* best = nullptr;
    for (const auto& c : out.candidates)
      if (!c.colocated && (!best || c.throughput > best->throughput))
        best = &c;
    return best ? *best : out.candidates.front();
  }();
  char text[320];
  if (best_split.colocated) {
    std::snprintf(text, sizeof text, "co-located on %zu core%s: %.1f tokens/s predicted at batch %zu from testbed %s "
                  "(no feasible split into attention and expert devices)",
                  cores, cores == 1 ? "" : "s", colocated.throughput, work.batch, bed.name.c_str());
  } else {
    std::snprintf(text, sizeof text, "%s on %zu cores: co-located %.1f tokens/s vs best split %zu + %zu devices of %zu "
                  "thread%s (r1 %zu, r2 %zu, %s) %.1f tokens/s, predicted at batch %zu from testbed %s",
                  out.chosen.colocated ? "co-located" : "disaggregated", cores, colocated.throughput, best_split.ag,
                  best_split.eg, best_split.threads_per_device, best_split.threads_per_device == 1 ? "" : "s",
                  best_split.plan.r1, best_split.plan.r2, std::string{to_string(best_split.plan.order)}.c_str(),
                  best_split.throughput, work.batch, bed.name.c_str());
  }
  out.reason = text;
  return out;
}

}  // namespace moert::policy
