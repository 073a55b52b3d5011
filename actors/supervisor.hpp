#pragma once

// Watches the data-path actors of one process (attention shards, μ-queues, experts) with CAF
// monitors and re-creates the one that dies, as an Erlang one_for_one supervisor does, with a
// bounded restart intensity: more than `max_restarts` restarts within `period` and it gives up
// (escalates): every child is stopped and the ingress ends each request, and refuses new ones,
// with an error naming what died and why. Nothing is left silent and nothing hangs.
//
// What a restart replays, so that outputs are those of the fault-free run bit for bit:
//   expert d     its μ-queue forgets it (its replacement pulls), and every shard sends again
//                the routes to device d whose outputs it still misses (A2E replay).
//   μ-queue d    the expert and the shards get the new queue, then the same A2E replay.
//   shard a      the new shard on the same device gets every request pinned to a from the
//                ingress, with the tokens its client already has: it rebuilds their KV by
//                prefill and goes on from there.
// Weights are shared read-only in the process, so a re-created actor costs a spawn.
//
// An actor that exits with `exit_reason::user_shutdown` or `normal` is not restarted: that is
// the engine stopping. A device task that throws makes its actor exit with the cause
// (device.hpp), which this supervisor treats like any other death.

#include "actors/device.hpp"
#include "actors/protocol.hpp"
#include "actors/runtime.hpp"

#include <caf/all.hpp>

#include <chrono>
#include <deque>
#include <map>
#include <string>
#include <vector>

namespace moert::actors {

struct supervision_params {
  std::size_t max_restarts = 3;               // within `period`; one more escalates
  std::chrono::milliseconds period{10000};
};

// What the supervisor needs to re-create each child as the engine first made it.
struct supervised_set {
  std::vector<caf::actor> shards, queues, experts;
  std::vector<device*> attention_devices, expert_devices;  // owned by the engine
  caf::actor ingress;
  caf::actor policy;
  execution_plan plan;
  scheduler_update scheduler;
};

// The supervisor's figures (answer to get_atom, as a string "restarts escalated
// last_recovery_us").
struct supervision_report {
  std::uint64_t restarts = 0;
  bool escalated = false;
  double last_recovery_us = 0;  // from the down message to the replay sent
};

class supervisor : public caf::event_based_actor {
public:
  supervisor(caf::actor_config& cfg, const runtime_context* ctx, supervised_set children, supervision_params params);

  caf::behavior make_behavior() override;
  void on_exit() override;

private:
  enum class kind { shard, queue, expert };
  struct child {
    kind what;
    std::size_t idx;
  };

  void watch(const caf::actor& actor, kind what, std::size_t idx);
  void on_down(const caf::down_msg& down);
  void restart(child who, const std::string& why);
  void escalate(const std::string& why);
  static const char* name_of(kind what);

  const runtime_context* ctx_;
  supervised_set set_;
  supervision_params params_;
  std::map<caf::actor_addr, child> children_;
  std::deque<std::chrono::steady_clock::time_point> restarts_;  // within the last period
  supervision_report report_;
  bool stopping_ = false;
  std::size_t downs_pending_ = 0;  // while escalating: children not yet down
  std::string escalation_;         // why, for the ingress once every child is down
};

}  // namespace moert::actors
