#pragma once

// Holds the current execution plan and queue-scheduler settings and pushes them to every
// shard and μ-queue; shards apply a new plan between steps. In this version the plan comes
// from the engine's configuration (the FinDEP solver re-solves online in a later issue).

#include "actors/protocol.hpp"

#include <caf/all.hpp>

namespace moert::actors {

class policy_actor : public caf::event_based_actor {
public:
  policy_actor(caf::actor_config& cfg, std::vector<caf::actor> shards, std::vector<caf::actor> queues,
               execution_plan plan, scheduler_update scheduler);

  caf::behavior make_behavior() override;

private:
  void push_all();

  std::vector<caf::actor> shards_;
  std::vector<caf::actor> queues_;
  execution_plan plan_;
  scheduler_update scheduler_;
};

}  // namespace moert::actors
