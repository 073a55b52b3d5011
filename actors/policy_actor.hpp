#pragma once

// Holds the current execution plan and queue-scheduler settings and pushes them to every
// shard and μ-queue; shards apply a new plan between steps, so no token is dropped.
//
// Online mode (when given a FinDEP problem): shards report the shape of each step; when the
// shape moves past the replan trigger's band (policy/replan.hpp), the actor re-solves with the
// FinDEP solver, logs the solve time and pushes the new plan.

#include "actors/protocol.hpp"
#include "actors/runtime.hpp"
#include "policy/findep.hpp"
#include "policy/model_shape.hpp"
#include "policy/perf_model.hpp"
#include "policy/replan.hpp"

#include <caf/all.hpp>

#include <map>
#include <optional>

namespace moert::actors {

// What the solver needs besides the observed shape.
struct online_problem {
  policy::model_shape shape;
  policy::testbed bed;
  std::size_t ag = 1;
  std::size_t eg = 1;
  policy::replan_params replan;
};

class policy_actor : public caf::event_based_actor {
public:
  policy_actor(caf::actor_config& cfg, const runtime_context* ctx, std::vector<caf::actor> shards,
               std::vector<caf::actor> queues, execution_plan plan, scheduler_update scheduler,
               std::optional<online_problem> online);

  caf::behavior make_behavior() override;
  void on_exit() override;

private:
  void push_all();
  void observe(const shape_report& report);

  const runtime_context* ctx_;
  std::vector<caf::actor> shards_;
  std::vector<caf::actor> queues_;
  execution_plan plan_;
  scheduler_update scheduler_;
  std::optional<online_problem> online_;
  policy::replan_trigger trigger_;
  std::map<std::uint32_t, shape_report> latest_;  // per shard
};

}  // namespace moert::actors
