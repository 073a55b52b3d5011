#pragma once

// The μ-queues of one expert device, one per (layer, local expert). A2E messages are split
// into them on arrival; when the device's expert actor is idle and pulls, the scheduler
// (policy/defrag.hpp) picks one queue and it is drained whole into one expert_batch, which
// re-batches tokens of different shards and micro-batches (AMoE, amoe-eps.md §2.3–2.9).

#include "actors/protocol.hpp"
#include "actors/runtime.hpp"

#include <caf/all.hpp>

#include <deque>

namespace moert::actors {

class mu_queue : public caf::event_based_actor {
public:
  // `track` names the expert device in traces.
  mu_queue(caf::actor_config& cfg, const runtime_context* ctx, std::size_t device_idx, scheduler_update scheduler,
           std::string track);

  caf::behavior make_behavior() override;
  void on_exit() override;

private:
  void enqueue(routed_tokens& msg);
  // Counts an A2E arrival; true when the fault plan killed this μ-queue on it.
  bool fault_kills();
  void dispatch();
  std::chrono::nanoseconds now() const;

  const runtime_context* ctx_;
  std::size_t device_idx_;
  std::size_t num_local_;
  std::vector<std::deque<queued_row>> queues_;  // layer × local expert
  policy::queue_matrix matrix_;
  scheduler_update scheduler_;
  caf::actor expert_;           // learnt from its first pull
  bool expert_waiting_ = false;
  std::string track_;
  std::uint64_t arrivals_ = 0;  // A2E messages that reached this device (fault plan kills)
};

}  // namespace moert::actors
