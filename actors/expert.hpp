#pragma once

// One expert device: hosts its experts of every layer, asks its mu_queue for work whenever it
// is idle, runs each batch on its device, and sends the weighted outputs straight back to each
// source shard (E2A), one message per destination micro-batch.

#include "actors/device.hpp"
#include "actors/protocol.hpp"
#include "actors/runtime.hpp"

#include <caf/all.hpp>

#include <memory>

namespace moert::actors {

class expert : public caf::event_based_actor {
public:
  expert(caf::actor_config& cfg, const runtime_context* ctx, std::size_t device_idx, device* dev,
         caf::actor queue);

  caf::behavior make_behavior() override;
  void on_exit() override;

private:
  // Two batches in flight: the next one is already queued on the device when the current one
  // ends, so the pull round trip never leaves the device idle. More would drain μ-queues
  // earlier than needed and shrink batches.
  static constexpr std::size_t max_in_flight = 2;

  void run(expert_batch& batch);
  void pull_if_room();

  const runtime_context* ctx_;
  std::size_t device_idx_;
  device* device_;  // owned by the engine; outlives this actor
  caf::actor queue_;
  std::size_t in_flight_ = 0;
  bool pull_pending_ = false;
};

}  // namespace moert::actors
