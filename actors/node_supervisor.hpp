#pragma once

// Node-level supervision of a cluster, in the calling process: watches every node_host and
// every μ-queue and attention shard the nodes host for this engine (CAF monitors; a node's
// death or a silence past the liveness timeout arrives as a down message), and re-places
// what a lost node held on the nodes that survive:
//
//   expert device d   a surviving expert node adopts it (node_host's adopt_atom: it loads d's
//                     experts from the checkpoint); every shard and the policy get the new
//                     μ-queue, then every shard re-sends the routes to d whose outputs it still
//                     misses (replay_atom, the in-process A2E replay).
//   attention shard a a surviving attention node adopts it; the ingress re-admits the
//                     requests pinned to a with the tokens their clients already have (KV
//                     rebuilt by prefill), as after a shard restart in one process.
//
// Outputs stay bit-identical: every expert row is computed alone from the same weights, and
// an E2A that arrives twice (from the lost node, late, and from its replacement) is ignored
// by join slot. A lost node is fenced: CAF has dropped its connection (which is how the loss
// was noticed), it is never asked again, and when it comes back (SIGCONT) it sees this engine
// go and tears its part down.
//
// When nothing can take over (no surviving node of the kind, or an adoption fails), the
// ingress ends every request with an error naming the lost node and refuses new ones, as
// before recovery existed.
//
// Thread safety: `cluster_health` is shared with the engine's thread (mutex inside).

#include "actors/node_host.hpp"
#include "actors/protocol.hpp"

#include <caf/all.hpp>

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace moert::actors {

// What the engine reads of a cluster's state: which nodes are lost, whether recovery gave up,
// and the recoveries done (for the report and the tests).
struct cluster_health {
  struct recovery {
    std::string node;        // the lost node
    std::string what;        // e.g. "expert device 1 -> e0"
    std::chrono::steady_clock::time_point noticed;  // the down message
    double recovery_ms = 0;  // down message -> the replacement's replay sent
  };
  mutable std::mutex mutex;
  std::vector<bool> lost;  // per node, file order
  bool failed = false;     // recovery impossible: every request ended with an error
  std::vector<recovery> recoveries;

  bool node_lost(std::size_t i) const {
    std::lock_guard<std::mutex> guard{mutex};
    return i < lost.size() && lost[i];
  }
  bool any_lost() const {
    std::lock_guard<std::mutex> guard{mutex};
    for (bool l : lost)
      if (l)
        return true;
    return false;
  }
};

struct supervised_node {
  caf::actor host;  // the node's node_host
  std::string name;
  bool attention = false, experts = false;  // what it hosts (it can adopt that kind)
  model_source part;                        // what it loaded at bring-up
};

struct cluster_placement {
  std::vector<supervised_node> nodes;
  std::vector<caf::actor> queues, shards;       // by global expert device / shard
  std::vector<std::size_t> queue_node, shard_node;  // node index of each
  caf::actor ingress, policy;
  model_source model;  // the engine's model source (no part chosen)
  std::uint32_t threads_per_device = 1;
  scheduler_update scheduler;
  plan_update plan;
  std::chrono::milliseconds adopt_timeout{60000};
  // A single μ-queue or shard that dies while its node lives (a fault plan's kill, a device
  // task that threw) is re-placed too, at most max_restarts times within restart_period;
  // one more gives up (as the in-process supervisor escalates).
  std::size_t max_restarts = 3;
  std::chrono::milliseconds restart_period{10000};
};

class node_supervisor : public caf::event_based_actor {
public:
  node_supervisor(caf::actor_config& cfg, cluster_placement placement, std::shared_ptr<cluster_health> health);

  caf::behavior make_behavior() override;
  void on_exit() override;

private:
  void on_down(const caf::down_msg& down);
  void lose(std::size_t node, const std::string& reason);
  void place_expert(std::uint32_t device, std::string lost_name, std::chrono::steady_clock::time_point since,
                    std::size_t tries);
  void place_shard(std::uint32_t shard, std::string lost_name, std::chrono::steady_clock::time_point since,
                   std::size_t tries);
  // The live node of that kind hosting the fewest parts; nodes.size() when none.
  std::size_t pick(bool attention) const;
  void give_up(const std::string& reason);

  cluster_placement p_;
  std::shared_ptr<cluster_health> health_;
  enum class kind { node, queue, shard };
  struct watched {
    std::size_t node;
    kind what;
    std::uint32_t idx;
  };
  void watch(const caf::actor& actor, std::size_t node, kind what, std::uint32_t idx);
  std::map<caf::actor_addr, watched> watched_;
  std::deque<std::chrono::steady_clock::time_point> restarts_;
  std::vector<bool> lost_;
  std::size_t experts_pending_ = 0;  // expert adoptions under way: shards wait for them
  std::vector<std::pair<std::uint32_t, std::pair<std::string, std::chrono::steady_clock::time_point>>>
      shards_waiting_;
  bool failed_ = false;
};

}  // namespace moert::actors
