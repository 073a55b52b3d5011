#include "actors/policy_actor.hpp"

namespace moert::actors {

policy_actor::policy_actor(caf::actor_config& cfg, std::vector<caf::actor> shards, std::vector<caf::actor> queues,
                           execution_plan plan, scheduler_update scheduler)
    : caf::event_based_actor(cfg),
      shards_(std::move(shards)),
      queues_(std::move(queues)),
      plan_(plan),
      scheduler_(std::move(scheduler)) {}

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
  };
}

void policy_actor::push_all() {
  for (const auto& shard : shards_)
    send(shard, plan_update{plan_});
  for (const auto& queue : queues_)
    send(queue, scheduler_);
}

}  // namespace moert::actors
