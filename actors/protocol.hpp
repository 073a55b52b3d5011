#pragma once

// Every message of the data path, in the order a token meets them (DESIGN.md §2):
//
//   client ─ admit_request ─▶ ingress ─ admit_request ─▶ attention_shard
//   attention_shard ─ routed_tokens (A2E) ─▶ mu_queue ─ expert_batch ─▶ expert (one per routed expert)
//   expert ─ expert_outputs (E2A) ─▶ attention_shard ─ token_event ─▶ client's token_sink
//   expert ─ expert_done ─▶ mu_queue (the device has room for another batch)
//   attention_shard ─ request_ended ─▶ ingress ─ last token_event ─▶ client's token_sink
//   attention_shard ─ shape_report ─▶ policy ─ plan_update ─▶ attention_shard
//   policy ─ scheduler_update ─▶ mu_queue
//
// Messages carry descriptors and leases, never activation bytes: a row_lease shares one
// immutable block of rows between the sender and every receiver in this process. The
// handles are copyable only because CAF 0.17 messages must be; the data path always moves
// them and never copies the rows. Crossing a process boundary replaces the lease with a
// transport descriptor (the transport issue); until then these types are local-only and
// whitelisted with CAF_ALLOW_UNSAFE_MESSAGE_TYPE.

#include "actors/token_sink.hpp"
#include "model/layers.hpp"
#include "model/sampler.hpp"
#include "policy/defrag.hpp"
#include "policy/plan.hpp"

#include <caf/all.hpp>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace moert::actors {

// -- atoms ----------------------------------------------------------------------

using expert_done_atom = caf::atom_constant<caf::atom("exp_done")>;  // expert → mu_queue: a batch finished
using step_atom = caf::atom_constant<caf::atom("step")>;            // shard → itself: next step
using cancel_atom = caf::atom_constant<caf::atom("cancel")>;        // client → ingress → shard
using drain_atom = caf::atom_constant<caf::atom("drain")>;          // engine → ingress: refuse new work
using policy_atom = caf::atom_constant<caf::atom("policy")>;        // engine → shard: where to report
using node_lost_atom = caf::atom_constant<caf::atom("node_lost")>;  // engine → ingress: a node is gone
// Supervision (actors/supervisor.hpp): a replacement actor takes over, and what was lost with
// the old one is sent again.
using shard_atom = caf::atom_constant<caf::atom("shard")>;        // supervisor → ingress, policy: new shard
using queue_atom = caf::atom_constant<caf::atom("queue")>;        // supervisor → shards, policy: new queue
// supervisor → mu_queue: (expert id, actor) the expert's new actor; hand it its batches.
using expert_atom = caf::atom_constant<caf::atom("expert")>;
// Moving an expert (supervisor → mu_queues, actors/mu_queue.hpp): the target adopts it (id,
// actor), then the source hands it off (id): it forwards the expert's queued rows, and any
// that still reach it, to the device the placement names.
using adopt_expert_atom = caf::atom_constant<caf::atom("adopt_exp")>;
using hand_off_atom = caf::atom_constant<caf::atom("hand_off")>;
using peers_atom = caf::atom_constant<caf::atom("peers")>;        // engine, supervisor → mu_queue: every queue
using move_atom = caf::atom_constant<caf::atom("move")>;          // engine → supervisor: move_expert
using replay_atom = caf::atom_constant<caf::atom("replay")>;      // supervisor → shard: resend A2E of a device
using kill_atom = caf::atom_constant<caf::atom("kill")>;          // engine → supervisor: fault injection

// Makes `dest` exit with `reason`, as a crash would (CAF 0.17's anon_send_exit takes only an
// exit_reason, and a failure should carry its cause).
inline void exit_with(const caf::actor& dest, caf::error reason) {
  if (dest)
    dest->enqueue(nullptr, caf::make_message_id(), caf::make_message(caf::exit_msg{dest.address(), std::move(reason)}),
                  nullptr);
}

// -- shared payloads --------------------------------------------------------------

// Rows of `row_floats` f32 values, immutable once shared.
struct row_block {
  std::vector<float> data;
  std::size_t row_floats = 0;
  const float* row(std::size_t idx) const { return data.data() + idx * row_floats; }
};
using row_lease = std::shared_ptr<const row_block>;

// -- client → ingress → shard -------------------------------------------------------

// The tokens a request's client has been given, recorded by its shard as it emits them: a
// replay after that shard died starts from them. Written on the shard's thread, read by the
// ingress once that shard is dead.
struct delivery_log {
  std::mutex mutex;
  std::vector<std::int32_t> tokens;
};

struct admit_request {
  std::uint64_t request_id = 0;
  std::vector<std::int32_t> prompt;
  std::size_t max_new_tokens = 0;
  model::sampling_params sampling;
  bool return_logits = false;
  bool return_prompt_logits = false;
  std::vector<std::int32_t> stop_token_ids;  // sorted: generation ends after one of these
  bool logprobs = false;                     // log-softmax of each drawn token
  std::size_t top_logprobs = 0;              // and of this many best tokens
  std::shared_ptr<token_sink> sink;
  std::chrono::steady_clock::time_point admitted{};  // set by the ingress when it pins
  // Tokens already delivered to the client (a replay after the request's shard died): the shard
  // takes them as generated and rebuilds their KV by prefilling prompt + replayed.
  std::vector<std::int32_t> replayed;
  std::shared_ptr<delivery_log> delivered;  // set by the ingress; stays in this process
  // Ends with request_error::deadline_exceeded if not done by then (epoch: no deadline).
  std::chrono::steady_clock::time_point deadline{};
  // Prompt + new tokens, saturating: a max_new_tokens near SIZE_MAX must not wrap to a small
  // reservation (it used to, and such a request ran until memory ran out).
  std::size_t kv_tokens() const {
    constexpr std::size_t most = std::numeric_limits<std::size_t>::max();
    return max_new_tokens > most - prompt.size() ? most : prompt.size() + max_new_tokens;
  }
  bool wants_logprobs() const { return logprobs || top_logprobs > 0; }
};

// shard → ingress: the request left the shard (finished, stopped or cancelled). The ingress
// releases the KV reservation and the id, and only then hands `last` to the sink: a client
// that reuses the id on hearing the end can no longer race the old request's release.
struct request_ended {
  std::uint64_t request_id = 0;
  std::uint64_t kv_tokens = 0;
  token_event last;
  std::shared_ptr<token_sink> sink;
};

// Pairs a send with its receipt in the trace (id 0: not traced).
struct trace_flow {
  std::uint64_t id = 0;
  std::chrono::steady_clock::time_point sent;
  std::string from_track;  // the sending device
};

// -- A2E: shard → mu_queue, one per (shard, micro-batch, chunk, expert device, layer) -----

// Names the micro-batch a row belongs to, for the way back.
struct batch_key {
  std::uint32_t shard = 0;
  std::uint64_t step = 0;
  std::uint32_t micro_batch = 0;
  std::uint32_t layer = 0;
};

struct route_entry {
  std::uint32_t row;           // row in routed_tokens::rows (the token's index in its micro-batch)
  std::uint32_t slot;          // token × top_k + k: where the output goes in the join
  std::uint32_t expert;        // the routed expert (global id); the receiving device's μ-queue finds its queue
  float weight;                // routing weight, applied by the expert (E2A carries weighted rows)
};

// Set when a message's rows travel outside it (UCX, actors/tensor_link.hpp): the receiver
// fetches `bytes` by `tag` before it uses the message. Zero tag: the rows are in the message.
struct wire_descriptor {
  std::uint64_t tag = 0;
  std::uint64_t bytes = 0;
  std::uint32_t row_floats = 0;
};

struct routed_tokens {
  wire_descriptor wire;
  batch_key key;
  std::uint32_t chunk = 0;
  row_lease rows;  // the micro-batch's post-attention normed rows (shared, not copied)
  std::vector<route_entry> routes;
  caf::actor reply_to;  // the source shard
  trace_flow flow;
  std::uint32_t attempt = 0;  // 0: first send; n: the n-th retransmission (fault_seam.hpp)
};

// -- mu_queue → expert: a whole μ-queue drained into one batch -----------------------

struct queued_row {
  row_lease rows;
  std::uint32_t row;
  std::uint32_t slot;
  float weight;
  batch_key key;
  caf::actor reply_to;
  std::uint32_t attempt = 0;  // of the A2E that brought it
  // The μ-queue's E2A bundle of the A2E that brought it (mu_queue.hpp), 0 when its output
  // goes to the shard on its own (the shard is in this process).
  std::uint64_t bundle = 0;
};

struct expert_batch {
  std::uint32_t layer = 0;
  std::uint32_t expert = 0;  // global id
  std::uint32_t device = 0;  // the expert device whose μ-queue handed it: it runs there
  std::vector<queued_row> items;
};

// -- E2A: expert → shard, weighted outputs of one batch for one micro-batch ----------
//
// Where the shard is in another process, the μ-queue sends instead one E2A per A2E it
// received, with the outputs of every expert batch that ran that A2E's rows (mu_queue.hpp).

struct expert_outputs {
  wire_descriptor wire;
  batch_key key;
  row_lease rows;                   // weighted expert outputs (shared by every destination)
  std::vector<std::uint32_t> rows_idx;  // row in `rows` for each entry
  std::vector<std::uint32_t> slots;     // join slot (token × top_k + k) for each entry
  trace_flow flow;
  std::uint32_t attempt = 0;  // the highest A2E attempt among its rows
};

// -- expert → mu_queue: outputs of bundled rows, returned with the batch's done ------------

// The weighted outputs of one expert batch's rows whose A2E crossed a process: the μ-queue
// that handed the batch gathers them into one E2A per A2E (mu_queue.hpp). Entry i is row
// rows_idx[i] of `rows`, for join slot slots[i] of bundle bundles[i]. Local only.
struct bundled_rows {
  row_lease rows;
  std::vector<std::uint64_t> bundles;
  std::vector<std::uint32_t> rows_idx;
  std::vector<std::uint32_t> slots;
};

// -- device → shard: what the sampler saw, computed only for sequences that asked ------------

struct token_logprobs {
  float logprob = 0;                     // log-softmax of the drawn token
  std::vector<std::int32_t> top_tokens;  // the best tokens, highest logit first
  std::vector<float> top_logprobs;       // and their log-softmax
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, token_logprobs& x) {
  return f(caf::meta::type_name("token_logprobs"), x.logprob, x.top_tokens, x.top_logprobs);
}

// -- policy → shards and queues --------------------------------------------------------

using policy::execution_plan;
using policy::segment_order;

struct plan_update {
  execution_plan plan;
};

// shard → policy, at the start of every step: the shape the FinDEP plan depends on.
struct shape_report {
  std::uint32_t shard = 0;
  std::size_t sequences = 0;       // in this step
  std::size_t context_tokens = 0;  // Σ over those sequences of their length after the step
};

struct scheduler_update {
  policy::queue_policy policy = policy::queue_policy::defrag;
  policy::defrag_params params;
};


// -- the wire ------------------------------------------------------------------------------
//
// Every message above that can cross a process has an inspect() (CAF 0.17 form). Inside one
// process CAF never serializes, so leases stay zero copy; across processes a row block travels
// as bytes (std::vector<uint8_t> takes CAF's memcpy path, vector<float> would not) holding
// only the rows its receiver uses, with the row indices renumbered to match. What a receiver
// reads is checked (row counts, indices, sizes) before it is used. A client's sink never
// travels: a remote shard sends its events to the ingress, which holds the sinks.

namespace wire {

// The rows of `block` named by `rows` (in first-use order), packed; `renumbered[i]` is the
// packed index of rows[i].
// A row index past the block is packed as no row at all would be: callers check what they
// send (a receiver checks it again).
inline std::vector<std::uint8_t> pack_rows(const row_block& block, const std::vector<std::uint32_t>& rows,
                                           std::vector<std::uint32_t>& renumbered) {
  constexpr auto unseen = std::numeric_limits<std::uint32_t>::max();
  std::size_t block_rows = block.row_floats ? block.data.size() / block.row_floats : 0;
  // Packed index of each block row, by a table rather than a search: an A2E of a prefill step
  // names ~1000 routes over ~500 rows, and a search made that quadratic.
  std::vector<std::uint32_t> packed(block_rows, unseen);
  std::vector<std::uint32_t> order;  // original row of each packed row
  renumbered.resize(rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] >= block_rows) {
      renumbered[i] = unseen;
      continue;
    }
    std::uint32_t& at = packed[rows[i]];
    if (at == unseen) {
      at = std::uint32_t(order.size());
      order.push_back(rows[i]);
    }
    renumbered[i] = at;
  }
  std::size_t row_bytes = block.row_floats * sizeof(float);
  std::vector<std::uint8_t> bytes(order.size() * row_bytes);
  for (std::size_t i = 0; i < order.size(); ++i)
    std::memcpy(bytes.data() + i * row_bytes, block.row(order[i]), row_bytes);
  return bytes;
}

// The block a receiver rebuilds; null when the sizes do not agree.
inline std::shared_ptr<row_block> unpack_rows(std::uint32_t row_floats, const std::vector<std::uint8_t>& bytes,
                                              std::size_t& num_rows) {
  std::size_t row_bytes = std::size_t(row_floats) * sizeof(float);
  if ((row_bytes == 0 && !bytes.empty()) || (row_bytes != 0 && bytes.size() % row_bytes != 0))
    return nullptr;
  auto block = std::make_shared<row_block>();
  block->row_floats = row_floats;
  block->data.resize(bytes.size() / sizeof(float));
  std::memcpy(block->data.data(), bytes.data(), bytes.size());
  num_rows = row_bytes ? bytes.size() / row_bytes : 0;
  return block;
}

inline bool routes_fit(const routed_tokens& x, std::size_t num_rows) {
  for (const auto& route : x.routes)
    if (route.row >= num_rows)
      return false;
  return true;
}

inline bool entries_fit(const expert_outputs& x, std::size_t num_rows) {
  for (auto row : x.rows_idx)
    if (row >= num_rows)
      return false;
  return true;
}

inline caf::error malformed(const char* what) {
  return caf::make_error(caf::sec::invalid_argument, std::string("malformed ") + what);
}

}  // namespace wire

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, token_event& x) {
  return f(caf::meta::type_name("token_event"), x.request_id, x.token, x.index, x.last, x.finish, x.error_code,
           x.error, x.logprob, x.top_logprobs, x.logits, x.prompt_logits);
}

// The sink and the admission time stay in the process that holds the client.
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, admit_request& x) {
  return f(caf::meta::type_name("admit_request"), x.request_id, x.prompt, x.max_new_tokens,
           x.sampling.temperature, x.sampling.top_k, x.sampling.top_p, x.sampling.seed, x.return_logits,
           x.return_prompt_logits, x.stop_token_ids, x.logprobs, x.top_logprobs, x.replayed);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, request_ended& x) {
  return f(caf::meta::type_name("request_ended"), x.request_id, x.kv_tokens, x.last);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, batch_key& x) {
  return f(caf::meta::type_name("batch_key"), x.shard, x.step, x.micro_batch, x.layer);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, route_entry& x) {
  return f(caf::meta::type_name("route_entry"), x.row, x.slot, x.expert, x.weight);
}

// A2E over a wire: only the rows this expert device's routes name.
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, routed_tokens& x) {
  std::uint32_t row_floats = x.rows ? std::uint32_t(x.rows->row_floats) : 0;
  if constexpr (Inspector::reads_state) {
    std::vector<std::uint32_t> rows, renumbered;
    for (const auto& route : x.routes)
      rows.push_back(route.row);
    std::vector<std::uint8_t> bytes;
    if (x.rows)
      bytes = wire::pack_rows(*x.rows, rows, renumbered);
    std::vector<route_entry> routes = x.routes;
    for (std::size_t i = 0; i < routes.size() && i < renumbered.size(); ++i)
      routes[i].row = renumbered[i];
    return f(caf::meta::type_name("routed_tokens"), x.wire.tag, x.wire.bytes, x.wire.row_floats, x.key, x.chunk,
             row_floats, bytes, routes, x.reply_to, x.flow.id, x.flow.from_track, x.attempt);
  } else {
    std::vector<std::uint8_t> bytes;
    auto err = f(caf::meta::type_name("routed_tokens"), x.wire.tag, x.wire.bytes, x.wire.row_floats, x.key, x.chunk,
                 row_floats, bytes, x.routes, x.reply_to, x.flow.id, x.flow.from_track, x.attempt);
    if (err)
      return err;
    x.flow.sent = std::chrono::steady_clock::now();
    if (x.wire.tag != 0)  // the rows come by UCX; tensor_link checks them on arrival
      return err;
    std::size_t num_rows = 0;
    auto block = wire::unpack_rows(row_floats, bytes, num_rows);
    if (!block)
      return wire::malformed("routed_tokens: row bytes");
    if (!wire::routes_fit(x, num_rows))
      return wire::malformed("routed_tokens: a route names a row that was not sent");
    x.rows = std::move(block);
    return err;
  }
}

// E2A over a wire: only the rows this destination's entries name.
template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, expert_outputs& x) {
  std::uint32_t row_floats = x.rows ? std::uint32_t(x.rows->row_floats) : 0;
  if constexpr (Inspector::reads_state) {
    std::vector<std::uint32_t> renumbered;
    std::vector<std::uint8_t> bytes;
    if (x.rows)
      bytes = wire::pack_rows(*x.rows, x.rows_idx, renumbered);
    auto& entries = x.rows ? renumbered : x.rows_idx;  // already packed when it comes by UCX
    return f(caf::meta::type_name("expert_outputs"), x.wire.tag, x.wire.bytes, x.wire.row_floats, x.key,
             row_floats, bytes, entries, x.slots, x.flow.id, x.flow.from_track, x.attempt);
  } else {
    std::vector<std::uint8_t> bytes;
    auto err = f(caf::meta::type_name("expert_outputs"), x.wire.tag, x.wire.bytes, x.wire.row_floats, x.key,
                 row_floats, bytes, x.rows_idx, x.slots, x.flow.id, x.flow.from_track, x.attempt);
    if (err)
      return err;
    x.flow.sent = std::chrono::steady_clock::now();
    if (x.rows_idx.size() != x.slots.size())
      return wire::malformed("expert_outputs: entry counts");
    if (x.wire.tag != 0)
      return err;
    std::size_t num_rows = 0;
    auto block = wire::unpack_rows(row_floats, bytes, num_rows);
    if (!block || !wire::entries_fit(x, num_rows))
      return wire::malformed("expert_outputs: an entry names a row that was not sent");
    x.rows = std::move(block);
    return err;
  }
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, plan_update& x) {
  return f(caf::meta::type_name("plan_update"), x.plan.r1, x.plan.m_a, x.plan.r2, x.plan.order);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, shape_report& x) {
  return f(caf::meta::type_name("shape_report"), x.shard, x.sequences, x.context_tokens);
}

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, scheduler_update& x) {
  return f(caf::meta::type_name("scheduler_update"), x.policy, x.params.delta, x.params.lookahead,
           x.params.max_wait, x.params.oldest_first_within_layer, x.params.oldest_first);
}

// Names every message type that can cross a process, for both ends' actor_system_config.
void register_message_types(caf::actor_system_config& config);

}  // namespace moert::actors

// Local only: an expert_batch is handed from a device's μ-queue to its expert in one process.
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moert::actors::expert_batch)
// Local only: an expert returns them to the μ-queue of its own device.
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moert::actors::bundled_rows)
