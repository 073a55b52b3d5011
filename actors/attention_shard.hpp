#pragma once

// One attention device: owns the KV cache of every request pinned to it, runs continuous
// batching (requests join and leave between steps), and executes each step as the plan says:
// r1 micro-batches, A2E in r2 chunks, attention and attention-side FFN segments in AASS, ASAS
// or PPPipe order. Expert outputs are joined per (request, layer) in expert-index order.
//
// Kernels run on the shard's device; the actor only decides and moves leases (never blocks).

#include "actors/device.hpp"
#include "actors/protocol.hpp"
#include "actors/runtime.hpp"
#include "model/kv_cache.hpp"

#include <caf/all.hpp>

#include <deque>
#include <map>
#include <memory>

namespace moert::actors {

// device_runnable (actors/device.hpp): its handlers may run on a device thread.
class attention_shard : public caf::event_based_actor, public device_runnable {
public:
  // `queues[d]` is the mu_queue of expert device d; `ingress` hears when a request ends.
  attention_shard(caf::actor_config& cfg, const runtime_context* ctx, std::uint32_t shard_idx,
                  device* dev, std::vector<caf::actor> queues, caf::actor ingress,
                  execution_plan plan);

  caf::behavior make_behavior() override;
  void on_exit() override;

private:
  struct sequence {
    admit_request request;
    model::kv_cache cache;
    std::vector<std::int32_t> generated;
    bool cancelled = false;
    // Tokens fed this step: the prompt (+ replayed tokens), whole or in chunks, then 1.
    std::size_t fed = 0;
    bool prefilling = true;  // the prompt (+ replayed) is not all in the cache yet
  };

  // Per micro-batch state of the running step. Buffers are written by device tasks; the actor
  // only touches a buffer while no task that uses it is queued or running (a same-size
  // resize of `side` while an attention task that does not read it is queued is the one case).
  struct micro_batch {
    std::vector<std::uint64_t> sequence_ids;
    std::vector<model::token_slot> tokens;  // one per row
    std::vector<std::int32_t> input_ids;
    std::vector<std::size_t> first_rows;    // the row of each sequence's first token this step
    std::vector<std::size_t> last_rows;     // the row of each sequence's last token
    gpu::buffer x;                          // residual stream, rows × hidden, on the device's backend
    std::shared_ptr<row_block> normed;      // this layer's expert input, shared with experts (host)
    // The same rows on the device's backend when its memory is not host memory (the attention
    // task writes them there and downloads `normed` for A2E); null on host memory.
    std::shared_ptr<gpu::buffer> normed_dev;
    std::vector<model::routed_slot> routes;
    gpu::buffer side;                       // attention-side FFN output of this layer (backend)
    bool side_valid = false;                // `side` will hold this layer's output (S posted)
    std::vector<const float*> weighted;     // join: row × top_k pointers into E2A leases
    std::vector<row_lease> held;            // keeps those leases alive until the combine
    std::size_t layer = 0;
    std::size_t top_k = 0;                  // of `layer`
    std::size_t outputs_pending = 0;
    // At-least-once A2E/E2A (with a fault plan): retransmissions of this layer's missing
    // routes so far, outputs still missing when the timer was armed, and whether the
    // retransmissions ran out (its requests ended with an error; nothing more happens here).
    std::uint32_t retransmits = 0;
    std::size_t pending_at_arm = 0;
    // The armed retransmission: due at `retransmit_due` for layer `armed_layer`, if armed.
    bool retransmit_armed = false;
    std::size_t armed_layer = 0;
    std::chrono::steady_clock::time_point retransmit_due{};
    bool failed = false;
    bool ready_attention = true;
    bool attention_done = false;
    bool side_pending = false;
    bool side_running = false;
    bool ready_final = false;
    bool a2e_sent = false;                  // this layer's A2E went out (a replay may resend it)
  };

  void admit(admit_request request);
  void cancel(std::uint64_t request_id);
  void start_step();
  void pump();
  void run_attention(std::size_t mb_idx);
  void run_side(std::size_t mb_idx);
  void run_final(std::size_t mb_idx);
  void on_attention_done(std::size_t mb_idx);
  void on_side_done(std::size_t mb_idx);
  void on_final_done(std::size_t mb_idx, std::vector<std::int32_t> tokens, std::vector<std::vector<float>> logits,
                     std::vector<token_logprobs> logprobs);
  void on_expert_outputs(expert_outputs& out);
  void send_a2e(std::size_t mb_idx);
  // Sends again every route of the running step to expert device `device_idx` whose output
  // has not arrived: that device's expert or queue died and a new one took over.
  void replay_a2e(std::size_t device_idx);
  void maybe_join(std::size_t mb_idx);
  // At-least-once delivery (with a fault plan, actors/fault_seam.hpp): a timer per micro-batch
  // and layer sends the routes whose outputs are missing again, with a doubling timeout; past
  // the plan's max_retransmits the micro-batch's requests end with an error naming the
  // expert devices that did not answer.
  void arm_retransmit(std::size_t mb_idx);
  // One timer per micro-batch index is enough (timer_due_): arming a later deadline while one
  // runs sends nothing, the timer re-arms itself for what is due when it fires. A timer per
  // layer and step was 8 CAF clock wake-ups per decode token, each firing a second later on
  // one of CAF's workers while the device computed.
  void ensure_timer(std::size_t mb_idx, std::chrono::steady_clock::time_point due);
  void on_retransmit_timer(std::uint32_t mb_idx, std::int64_t due_ns);
  void resend_missing(std::size_t mb_idx, std::uint32_t attempt);
  void fail_micro_batch(std::size_t mb_idx, const std::string& why);
  // The request leaves the shard; `last` reaches its sink through the ingress.
  void finish_request(std::uint64_t id, token_event last);
  device::error_handler exit_on_error();
  // The weights this shard's device reads: its own copy when it has one, else the engine's.
  const model::model_weights& weights() const;

  const runtime_context* ctx_;
  std::uint32_t shard_idx_;
  device* device_;  // owned by the engine; outlives this actor
  std::vector<caf::actor> queues_;
  caf::actor ingress_;
  caf::actor policy_;  // hears the shape of every step; may stay unset
  execution_plan plan_;
  execution_plan next_plan_;
  model::rope_table rope_;

  std::map<std::uint64_t, sequence> sequences_;  // running, in admission order by id
  std::deque<std::uint64_t> order_;              // admission order
  std::uint64_t step_ = 0;
  bool step_running_ = false;
  static constexpr std::size_t max_in_flight = 2;  // device tasks posted and not yet done
  std::size_t in_flight_ = 0;
  std::vector<micro_batch> batches_;
  // Per micro-batch index, across steps: when its earliest timer in flight fires (max: none).
  std::vector<std::chrono::steady_clock::time_point> timer_due_;
  std::size_t batches_finished_ = 0;
  std::uint64_t e2a_arrivals_ = 0;  // E2A messages that reached this shard (fault plan kills)
};

}  // namespace moert::actors
