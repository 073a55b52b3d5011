#pragma once

// The fault injector: what a seeded fault plan does to each A2E/E2A message, and which
// actors it kills and devices it slows. No CAF and no I/O: the actors ask it at their send
// seam (actors/fault_seam.hpp) and carry the decision out themselves.
//
// A decision is a pure function of (seed, message identity): the same seed makes the same
// decision for the same message, whichever thread asks and whenever. The identity includes
// the attempt (0 for a first send, n for the n-th retransmission), so a retransmission draws
// afresh and a message dropped once is not dropped forever. Which messages exist in a run
// still depends on scheduling (continuous batching joins requests between steps, μ-queues
// re-batch by arrival), so a seed reproduces decisions, not a whole run's schedule.
//
// Thread safety: decide() and the queries are const and may be called from any thread; the
// counters are atomic.

#include <array>
#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace moert::transport {

// -- the plan --------------------------------------------------------------------------

enum class fault_actor { expert, attention, queue };

const char* to_string(fault_actor actor);

// Kills the `actor` of device `device` once `after_messages` A2E (expert, queue) or E2A
// (attention) messages have reached that device.
struct fault_kill {
  fault_actor actor = fault_actor::expert;
  std::uint32_t device = 0;
  std::uint64_t after_messages = 0;
};

// Every task of the device named `device` ("expert:1", "attention:0") takes `factor` times
// as long.
struct fault_slow {
  std::string device;
  double factor = 1.0;
};

// A node process signals itself once it has sent `after_messages` A2E/E2A messages: kill is
// SIGKILL; stop is SIGSTOP, and a helper process it forks first sends SIGCONT after `for_ms`.
enum class fault_signal { kill, stop };

const char* to_string(fault_signal signal);

struct fault_node {
  std::string node;  // the cluster file's node name
  fault_signal signal = fault_signal::kill;
  std::uint64_t after_messages = 0;
  std::uint64_t for_ms = 0;  // stop only
};

struct fault_plan {
  std::uint64_t seed = 0;
  // Probabilities per A2E/E2A message (each in [0, 1], their sum at most 1).
  double drop = 0.0;
  double duplicate = 0.0;
  double reorder = 0.0;
  double delay_probability = 0.0;
  double delay_max_ms = 0.0;  // a delayed message waits uniformly in [0, delay_max_ms]
  std::vector<fault_kill> kill;
  std::vector<fault_slow> slow;
  std::vector<fault_node> nodes;  // a cluster only
  // At-least-once delivery: a micro-batch's missing E2A rows are asked again after
  // retransmit_ms, doubling up to retransmit_max_ms, at most max_retransmits times; then its
  // requests end with an error.
  double retransmit_ms = 25.0;
  double retransmit_max_ms = 1000.0;
  std::uint32_t max_retransmits = 12;

  bool message_faults() const { return drop > 0 || duplicate > 0 || reorder > 0 || delay_probability > 0; }
  bool empty() const { return !message_faults() && kill.empty() && slow.empty() && nodes.empty(); }
};

// The plan an engine or node runs without a fault file: no fault, but A2E/E2A delivery is
// still at least once (a message lost anyway, e.g. with an actor that died holding it, is
// asked again). Its timeouts are generous, so a batch that is only slow is rarely sent twice:
// first after 1 s, doubling to 10 s, and a micro-batch fails only after 60 retransmissions
// (about 9 minutes without an answer).
fault_plan without_faults();

// -- decisions ------------------------------------------------------------------------

enum class message_kind : std::uint8_t { a2e, e2a };

// What names one A2E or E2A message: its micro-batch (shard, step, micro-batch, layer), the
// A2E chunk, the expert device at the other end, and the attempt. `detail` separates messages
// that share the rest (an E2A's first join slot).
struct message_identity {
  message_kind kind = message_kind::a2e;
  std::uint32_t shard = 0;
  std::uint64_t step = 0;
  std::uint32_t micro_batch = 0;
  std::uint32_t layer = 0;
  std::uint32_t chunk = 0;
  std::uint32_t expert_device = 0;
  std::uint32_t attempt = 0;
  std::uint64_t detail = 0;
};

enum class fault_action : std::uint8_t { deliver, drop, duplicate, reorder, delay };

const char* to_string(fault_action action);

struct fault_decision {
  fault_action action = fault_action::deliver;
  double delay_ms = 0.0;  // for delay
};

// What the injector did and what the runtime did about it, by type.
struct fault_counts {
  std::uint64_t messages = 0;  // A2E/E2A messages the injector decided on
  std::uint64_t dropped = 0, duplicated = 0, reordered = 0, delayed = 0;
  std::uint64_t killed = 0;         // actors killed
  std::uint64_t slowed_tasks = 0;   // device tasks stretched (the engine counts them)
  std::uint64_t retransmitted = 0;  // A2E messages sent again by a shard
  std::uint64_t ignored_e2a = 0;    // E2A entries that arrived twice or late and were ignored
  std::uint64_t failed_batches = 0; // micro-batches whose retransmissions ran out
  std::uint64_t node_faults = 0;    // nodes of the plan's "nodes" that were lost (the engine counts)
  std::uint64_t injected() const { return dropped + duplicated + reordered + delayed + killed + node_faults; }
  // Sums every count: a report over runs or over nodes.
  fault_counts& operator+=(const fault_counts& other) {
    messages += other.messages;
    dropped += other.dropped;
    duplicated += other.duplicated;
    reordered += other.reordered;
    delayed += other.delayed;
    killed += other.killed;
    slowed_tasks += other.slowed_tasks;
    retransmitted += other.retransmitted;
    ignored_e2a += other.ignored_e2a;
    failed_batches += other.failed_batches;
    node_faults += other.node_faults;
    return *this;
  }
};

class fault_injector {
public:
  explicit fault_injector(fault_plan plan);

  const fault_plan& plan() const { return plan_; }

  // Pure: the same plan and identity give the same decision.
  fault_decision decide(const message_identity& id) const;
  // decide(), counted.
  fault_decision decide_and_count(const message_identity& id);

  // The kill due for `actor` of `device` now that `messages` have reached it, once: the
  // first caller that crosses the threshold gets it (and it is counted), later calls nullopt.
  std::optional<fault_kill> kill_due(fault_actor actor, std::uint32_t device, std::uint64_t messages);
  // Whether the plan has a kill for that actor at all (so a device counts its messages).
  bool watches(fault_actor actor, std::uint32_t device) const;
  // Kills carried out so far, e.g. "expert of device 0 after 50 messages", for error texts.
  std::string kills_text(fault_actor actor, std::uint32_t device) const;

  // The slow-down factor of the device named `kind:index` ("expert:1"); 1 when none.
  double slowdown(std::string_view kind, std::size_t index) const;

  // A part re-placed after a loss must not be killed again by the plan: the plan's kills of
  // that device (or shard) fire once, where it lived at first. Call before its actors exist.
  void disarm_kills(fault_actor actor, std::uint32_t device);

  // In a node process: which of the plan's node faults are this node's own.
  void watch_node(const std::string& name);
  // The node fault due now that this node has sent its messages (decide_and_count counts
  // them), once; nullopt otherwise. Cheap when the plan has none for this node.
  std::optional<fault_node> node_fault_due();

  // A test's seam, with or without a plan: the next `n` A2E/E2A messages decided by any
  // injector of this process are dropped (and counted as dropped). Only tests call it
  // (tests/fault/at_least_once); it costs one relaxed atomic load per message otherwise.
  static void drop_next_for_testing(std::uint64_t n);

  void count_retransmits(std::uint64_t n) { retransmitted_ += n; }
  void count_ignored_e2a(std::uint64_t n) { ignored_e2a_ += n; }
  void count_failed_batch() { ++failed_batches_; }

  fault_counts counts() const;

private:
  fault_plan plan_;
  std::atomic<std::uint64_t> messages_{0}, dropped_{0}, duplicated_{0}, reordered_{0}, delayed_{0};
  std::atomic<std::uint64_t> retransmitted_{0}, ignored_e2a_{0}, failed_batches_{0};
  // One flag per plan.kill entry: carried out.
  std::vector<std::atomic<bool>> fired_;
  std::vector<bool> disarmed_;  // per plan.kill entry
  std::vector<std::size_t> own_nodes_;  // indexes into plan_.nodes naming this node
  std::vector<std::atomic<bool>> node_fired_;
};

}  // namespace moert::transport
