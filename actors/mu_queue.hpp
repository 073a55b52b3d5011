#pragma once

// The μ-queues of one expert device, one per (layer, hosted expert). A2E messages are split
// into them on arrival; while the device has room (fewer than two batches in flight), the
// scheduler (policy/defrag.hpp) picks one queue and it is drained whole into one expert_batch,
// which re-batches tokens of different shards and micro-batches (AMoE, amoe-eps.md §2.3–2.9),
// and is handed to that expert's own actor (actors/expert.hpp), which answers expert_done when
// it has run. One hand-off and one done per batch: as many messages as the pull and the batch
// of one expert actor per device.
//
// Two batches in flight per lane of the device (device::lanes(): a multi-threaded cpu device
// runs that many expert batches side by side, one per thread): the next one is already
// queued when the current one ends, so the done round trip never leaves the device idle.
// More would drain μ-queues earlier than needed and shrink batches. The experts of the device
// share its executor, so the bound is the queue's, not each expert's.
//
// Moving an expert here (adopt) or away (hand_off, actors/protocol.hpp): the hosted set
// changes, the scheduler sees the queues of the hosted experts in ascending id order (with no
// move, the order of the round-robin local indices, so its choices are those of before). Rows
// of an expert this device no longer hosts, queued or arriving late (a shard that read the
// placement before the move), are forwarded to the device that hosts it now: nothing is lost.
//
// E2A bundles: the rows of an A2E from a shard in another process go back as ONE E2A (one
// CAF descriptor, one UCX transfer), not one per expert batch that ran some of them: each
// such A2E opens a bundle of the rows it queued here; the experts return those rows' outputs
// with their done, and the bundle leaves when its last row is computed. A bundle waits only
// for its own A2E's rows. Rows that leave the device (handed off to another, or lost with an
// expert actor that died) are taken off their bundle, so it still leaves with what was
// computed; the shard's retransmission or replay brings the rest, and the shard ignores an
// entry it already has. A bundle's entries go in join-slot order, so its bytes and its fault
// identity do not depend on which expert batch finished first. A bundle still open half a
// retransmission interval after it opened sends what it holds so far (and again each half
// interval): the shard's timer reads arriving outputs as a slow device, not a lost A2E.
// Shards in this process get their outputs from the experts directly.

#include "actors/device.hpp"
#include "actors/protocol.hpp"
#include "actors/runtime.hpp"

#include <caf/all.hpp>

#include <chrono>
#include <deque>
#include <map>

namespace moert::actors {

// device_runnable (actors/device.hpp): its handlers may run on a device thread.
class mu_queue : public caf::event_based_actor, public device_runnable {
public:
  // `track` names the expert device in traces; `experts` the actors of the experts it hosts
  // (ctx->hosted_by(device_idx)), by expert id.
  mu_queue(caf::actor_config& cfg, const runtime_context* ctx, std::size_t device_idx, scheduler_update scheduler,
           std::string track, std::map<std::uint32_t, caf::actor> experts);

  caf::behavior make_behavior() override;
  void on_exit() override;

private:
  // Two batches per lane of the device (device::lanes(): its experts run side by side).
  static constexpr std::size_t in_flight_per_lane = 2;

  struct handed {
    caf::actor_addr to;     // the actor that has them
    std::size_t count = 0;  // batches not yet done
    std::map<std::uint64_t, std::size_t> bundled;  // rows of each bundle in those batches
  };

  // The E2A of one A2E from another process, filled as its rows are computed.
  struct bundle {
    batch_key key;
    caf::actor reply_to;
    std::uint32_t attempt = 0;
    std::size_t pending = 0;            // rows queued or running here
    std::shared_ptr<row_block> rows;    // the outputs so far, in arrival order
    std::vector<std::uint32_t> slots;   // their join slots
    std::chrono::steady_clock::time_point last_sent;  // opened, or its last partial E2A
  };

  void enqueue(routed_tokens& msg);
  // Counts an A2E arrival; true when the fault plan killed this μ-queue on it.
  bool fault_kills();
  void dispatch();
  // The hosted set becomes `hosted` (ascending); rows queued for experts still hosted stay.
  void rehost(std::vector<std::uint32_t> hosted);
  void forward(std::vector<queued_row> rows, std::uint32_t expert);
  void send_on(std::size_t dev, routed_tokens part);
  std::size_t slot_of(std::uint32_t expert) const;  // npos: not hosted
  std::chrono::nanoseconds now() const;
  // `count` rows of bundle `id` are done or gone; the bundle leaves once none is pending.
  void settle(std::uint64_t id, std::size_t count);
  // What `b` holds, as one E2A in join-slot order (its rows and slots are moved out).
  void send_bundle(bundle& b);
  // The rows of `h`'s batches are lost with its actor.
  void lose_bundled(handed& h);
  void on_bundled(handed& h, bundled_rows& rows);

  const runtime_context* ctx_;
  std::size_t device_idx_;
  std::vector<std::uint32_t> hosted_;           // expert ids, ascending
  std::vector<std::deque<queued_row>> queues_;  // layer × hosted slot
  policy::queue_matrix matrix_;
  scheduler_update scheduler_;
  std::map<std::uint32_t, caf::actor> experts_;  // hosted expert → its actor (absent: dead)
  std::map<std::uint32_t, handed> handed_;        // batches in flight, by expert
  std::size_t in_flight_ = 0;
  std::size_t max_in_flight_ = in_flight_per_lane;
  std::vector<caf::actor> peers_;                 // every device's μ-queue (forwarding)
  std::vector<routed_tokens> held_;               // rows for an expert placed here, not yet adopted
  std::string track_;
  std::uint64_t arrivals_ = 0;  // A2E messages that reached this device (fault plan kills)
  std::map<std::uint64_t, bundle> bundles_;  // open E2A bundles by id (never 0)
  std::uint64_t next_bundle_ = 0;
};

}  // namespace moert::actors
