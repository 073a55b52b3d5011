#include "actors/policy_actor.hpp"

#include <spdlog/spdlog.h>

#include <chrono>

namespace moert::actors {

policy_actor::policy_actor(caf::actor_config& cfg, const runtime_context* ctx, std::vector<caf::actor> shards,
                           std::vector<caf::actor> queues, execution_plan plan, scheduler_update scheduler,
                           std::optional<online_problem> online)
    : caf::event_based_actor(cfg),
      ctx_(ctx),
      shards_(std::move(shards)),
      queues_(std::move(queues)),
      plan_(plan),
      scheduler_(std::move(scheduler)),
      online_(std::move(online)),
      trigger_(online_ ? online_->replan : policy::replan_params{}) {}

void policy_actor::on_exit() {  // break handle cycles (see attention_shard::on_exit)
  shards_.clear();
  queues_.clear();
}

caf::behavior policy_actor::make_behavior() {
  push_all();
  return {
    [this](plan_update& update) {
      plan_ = update.plan;
      push_all();
    },
    [this](scheduler_update& update) {
      scheduler_ = update;
      push_all();
    },
    [this](shape_report& report) { observe(report); },
    // A replacement from the supervisor: it gets the current plan or queue settings at once.
    [this](shard_atom, std::uint32_t idx, caf::actor& shard) {
      if (idx < shards_.size()) {
        shards_[idx] = shard;
        send(shard, plan_update{plan_});
      }
    },
    [this](queue_atom, std::uint32_t idx, caf::actor& queue) {
      if (idx < queues_.size()) {
        queues_[idx] = queue;
        send(queue, scheduler_);
      }
    },
  };
}

void policy_actor::push_all() {
  for (const auto& shard : shards_)
    send(shard, plan_update{plan_});
  for (const auto& queue : queues_)
    send(queue, scheduler_);
}

void policy_actor::observe(const shape_report& report) {
  if (!online_)
    return;
  latest_[report.shard] = report;
  policy::workload_shape shape;
  std::size_t context = 0;
  for (const auto& [shard, r] : latest_) {
    shape.batch += r.sequences;
    context += r.context_tokens;
  }
  shape.seq_len = shape.batch ? context / shape.batch : 0;
  if (!trigger_.observe(shape))
    return;
  trigger_.solved(shape);  // also on failure: do not retry every step for the same shape

  // The decision itself is pure and sub-millisecond (bench: solver-time), so it runs inline.
  auto start = std::chrono::steady_clock::now();
  auto instance = policy::make_instance(online_->shape, online_->bed, online_->ag, online_->eg,
                                        std::max<std::size_t>(1, shape.seq_len), online_->shape.num_moe_layers(),
                                        shape.batch);
  auto solved = instance ? policy::solve(*instance) : result<policy::plan>{instance.err()};
  double micros = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
  if (!solved) {
    spdlog::warn("policy: no plan for batch {} × {} tokens: {}", shape.batch, shape.seq_len, solved.err().message);
    return;
  }
  plan_ = policy::to_execution_plan(*solved);
  // m_a counts sequences per attention device; the shard splits its own batch.
  ctx_->stats->record_replan(micros);
  spdlog::info("policy: re-solved for batch {} × {} tokens in {:.0f} µs: m_a {}, r1 {}, r2 {}, {} ({:.0f} tokens/s "
               "predicted)",
               shape.batch, shape.seq_len, micros, plan_.m_a, plan_.r1, plan_.r2, policy::to_string(plan_.order),
               solved->throughput);
  push_all();
}

}  // namespace moert::actors
