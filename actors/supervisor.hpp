#pragma once

// Watches the data-path actors of one process (attention shards, μ-queues, experts) with CAF
// monitors and re-creates the one that dies, as an Erlang one_for_one supervisor does, with a
// bounded restart intensity: more than `max_restarts` restarts within `period` and it gives up
// (escalates): every child is stopped and the ingress ends each request, and refuses new ones,
// with an error naming what died and why. Nothing is left silent and nothing hangs.
//
// What a restart replays, so that outputs are those of the fault-free run bit for bit:
//   expert e     (one actor per routed expert) its μ-queue gets the replacement, and every
//                shard sends again the routes to e's device whose outputs it still misses
//                (A2E replay). Experts count restarts each on their own: one more than
//                max_restarts within period and e's device counts as lost: every expert on
//                it is re-created on the surviving expert devices (the least loaded first)
//                and moved there as move_atom moves one, then the A2E replay to those
//                devices. Only when no expert device survives does it escalate.
//   μ-queue d    the shards and the other queues get the new queue, then the same A2E replay.
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
  std::vector<caf::actor> shards, queues;  // by attention / expert device
  std::vector<caf::actor> experts;         // by expert id
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

// Also moves an expert at run time (move_atom, expert id, device → "" or why not): the target's
// μ-queue adopts it, the placement changes, the source's μ-queue hands it off (forwarding the
// rows it holds or still gets for it). The expert's actor stays; no token is lost or computed
// differently (every expert row is computed alone).
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
  void watch_fresh(const caf::actor& actor, kind what, std::size_t idx);  // a replacement: also recorded in the census
  void on_down(const caf::down_msg& down);
  void restart(child who, const std::string& why);
  // Re-places every expert of the lost expert device `device`; false when none survives.
  bool replace_device(std::size_t device, const std::string& why);
  std::string move(std::uint32_t expert, std::uint32_t device);
  void escalate(const std::string& why);
  static const char* name_of(kind what);

  const runtime_context* ctx_;
  supervised_set set_;
  supervision_params params_;
  std::map<caf::actor_addr, child> children_;
  std::deque<std::chrono::steady_clock::time_point> restarts_;  // shards, queues: within the last period
  std::vector<std::deque<std::chrono::steady_clock::time_point>> expert_restarts_;  // by expert
  std::vector<bool> lost_;  // by expert device: its experts were re-placed
  supervision_report report_;
  bool stopping_ = false;
  std::size_t downs_pending_ = 0;  // while escalating: children not yet down
  std::string escalation_;         // why, for the ingress once every child is down
};

}  // namespace moert::actors
