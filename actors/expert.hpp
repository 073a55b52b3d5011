#pragma once

// One routed expert: its weights of every layer (shared read-only in the process), run on the
// device of whichever μ-queue hands it a batch. It runs each batch on that device, sends the
// weighted outputs straight back to each source shard (E2A), one message per destination
// micro-batch, and tells the μ-queue that handed the batch that it is done (the device has
// room again). Outputs for a shard in another process go back with that done instead: the
// μ-queue sends one E2A per A2E it received (mu_queue.hpp). Supervised on its own (actors/supervisor.hpp); moving it to another device
// (Engine::move_expert) needs nothing from it: the μ-queues change, the actor stays.
//
// The experts of one device share its executor; the μ-queue keeps at most two batches in
// flight per device (mu_queue.hpp says why).

#include "actors/device.hpp"
#include "actors/protocol.hpp"
#include "actors/runtime.hpp"

#include <caf/all.hpp>

#include <memory>

namespace moert::actors {

// device_runnable (actors/device.hpp): its handlers may run on a device thread.
class expert : public caf::event_based_actor, public device_runnable {
public:
  expert(caf::actor_config& cfg, const runtime_context* ctx, std::uint32_t expert_id);

  caf::behavior make_behavior() override;

private:
  void run(expert_batch& batch, caf::actor queue);

  const runtime_context* ctx_;
  std::uint32_t expert_id_;
};

}  // namespace moert::actors
