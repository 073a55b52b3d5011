#pragma once

// The send seam of A2E and E2A: every such message leaves its actor through transmit_data(),
// which asks the engine's fault injector (transport/fault_injector.hpp, when the engine has a
// fault plan) what to do with it, then hands it to the tensor link (another process) or to
// CAF (this process). So the same faults hit one process and a cluster alike.
//
//   drop       the message is not sent (the shard's retransmission recovers it)
//   duplicate  it is sent twice (the shard ignores the second copy's entries)
//   reorder    it goes back through the sender's mailbox, so what the sender sends next
//              overtakes it (the top-K join combines in slot order, not arrival order)
//   delay      it is sent after a seeded delay, by the sender's clock
//
// A held-back message comes back to its sender as (fault_release_atom, destination, message);
// the sender's behavior hands it to transmit() (attention_shard, expert and, for its E2A
// bundles, mu_queue do).

#include "actors/protocol.hpp"
#include "actors/runtime.hpp"
#include "actors/tensor_link.hpp"
#include "transport/fault_injector.hpp"

#include <caf/all.hpp>

#include <chrono>

namespace moert::actors {

using fault_release_atom = caf::atom_constant<caf::atom("fault_rel")>;  // sender → itself: send it now

// To another process by the tensor link, else by CAF.
template <class Message>
void transmit(caf::event_based_actor* self, const runtime_context* ctx, const caf::actor& dest, Message msg) {
  if (ctx->link && ctx->link->remote(dest))
    ctx->link->ship(self, dest, std::move(msg));
  else
    self->send(dest, std::move(msg));
}

// An E2A's identity for the fault plan: its destination micro-batch, the expert device that
// sends it, the attempt, and its first join slot (which of that micro-batch's E2A it is).
inline transport::message_identity e2a_identity(const expert_outputs& out, std::uint32_t device) {
  return {transport::message_kind::e2a, out.key.shard, out.key.step, out.key.micro_batch, out.key.layer, 0, device,
          out.attempt, out.slots.empty() ? 0 : out.slots.front()};
}

// A node fault of the plan (fault_injector::node_fault_due) carried out on this process:
// SIGKILL, or SIGSTOP with a helper that resumes it after for_ms (node_host.cpp).
void carry_out_node_fault(const transport::fault_node& fault);

template <class Message>
void transmit_data(caf::event_based_actor* self, const runtime_context* ctx, const caf::actor& dest, Message msg,
                   const transport::message_identity& id) {
  if (!ctx->faults)
    return transmit(self, ctx, dest, std::move(msg));
  transport::fault_decision d = ctx->faults->decide_and_count(id);
  if (auto node_fault = ctx->faults->node_fault_due())
    carry_out_node_fault(*node_fault);  // a stopped node sends this message when it resumes
  switch (d.action) {
    case transport::fault_action::deliver:
      return transmit(self, ctx, dest, std::move(msg));
    case transport::fault_action::drop:
      return;
    case transport::fault_action::duplicate:
      transmit(self, ctx, dest, msg);  // a copy: leases are shared, rows are not copied
      return transmit(self, ctx, dest, std::move(msg));
    case transport::fault_action::reorder:
      return self->send(self, fault_release_atom::value, dest, std::move(msg));
    case transport::fault_action::delay: {
      auto wait = std::chrono::microseconds(std::int64_t(d.delay_ms * 1000.0));
      return self->delayed_send(self, wait, fault_release_atom::value, dest, std::move(msg));
    }
  }
}

// The actor's error when the fault injector kills it: a distinct reason its supervisor (and
// an error text) can name.
inline caf::error fault_kill_reason(const transport::fault_kill& kill) {
  return caf::make_error(caf::sec::runtime_error, std::string{"fault injector killed the "} +
                                                      transport::to_string(kill.actor) + " actor of device " +
                                                      std::to_string(kill.device) + " after " +
                                                      std::to_string(kill.after_messages) + " messages");
}

}  // namespace moert::actors
