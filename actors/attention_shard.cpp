#include "actors/attention_shard.hpp"
#include "actors/completion.hpp"
#include "actors/fault_seam.hpp"
#include "actors/mailbox_size.hpp"
#include "actors/tensor_link.hpp"

#include "model/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moert::actors {

namespace {

// Log-softmax of the drawn token and of the `top` best tokens (highest logit first, the lower
// id first on a tie), over one row of logits. Only for sequences that asked: a full pass over
// the vocabulary, in double so the normaliser does not depend on the summation's rounding.
token_logprobs log_softmax_of(std::span<const float> logits, std::int32_t token, std::size_t top) {
  float max = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float v : logits)
    sum += std::exp(double(v) - double(max));
  double log_norm = double(max) + std::log(sum);
  token_logprobs out;
  out.logprob = float(double(logits[std::size_t(token)]) - log_norm);
  top = std::min(top, logits.size());
  if (top > 0) {
    std::vector<std::int32_t> ids(logits.size());
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + std::ptrdiff_t(top), ids.end(), [&](std::int32_t a, std::int32_t b) {
      float la = logits[std::size_t(a)], lb = logits[std::size_t(b)];
      return la > lb || (la == lb && a < b);
    });
    for (std::size_t i = 0; i < top; ++i) {
      out.top_tokens.push_back(ids[i]);
      out.top_logprobs.push_back(float(double(logits[std::size_t(ids[i])]) - log_norm));
    }
  }
  return out;
}

// Completions posted by the shard's own device tasks.
using attention_done_atom = caf::atom_constant<caf::atom("attn_done")>;
using side_done_atom = caf::atom_constant<caf::atom("side_done")>;
using final_done_atom = caf::atom_constant<caf::atom("final_done")>;
// At-least-once A2E/E2A: a micro-batch index's timer (index, when it was due, ns since epoch).
using retransmit_atom = caf::atom_constant<caf::atom("retransmit")>;

}  // namespace

attention_shard::attention_shard(caf::actor_config& cfg, const runtime_context* ctx, std::uint32_t shard_idx,
                                 device* dev, std::vector<caf::actor> queues, caf::actor ingress,
                                 execution_plan plan)
    : caf::event_based_actor(cfg),
      ctx_(ctx),
      shard_idx_(shard_idx),
      device_(dev),
      queues_(std::move(queues)),
      ingress_(std::move(ingress)),
      plan_(plan),
      next_plan_(plan),
      rope_(ctx->config) {}

// Actor handles are strong references: drop them so shards, queues and experts that point at
// each other do not keep each other alive after they stop. The batches and sequences stay:
// a device task still queued or running reads them (through `this` and references), and it
// holds a strong reference to this actor, so they live exactly as long as the last such task
// (clearing them here was a use-after-free on the device thread when a shard died mid-step).
void attention_shard::on_exit() {
  queues_.clear();
  ingress_ = nullptr;
  policy_ = nullptr;
}

// A device task that throws makes this shard exit with the task and the cause as its reason:
// the supervisor replays its requests, or ends them naming the cause once restarts run out.
const model::model_weights& attention_shard::weights() const {
  return device_->weights() ? *device_->weights() : *ctx_->weights;
}

device::error_handler attention_shard::exit_on_error() {
  caf::actor self = caf::actor_cast<caf::actor>(this);
  return [self](std::string why) { exit_with(self, caf::make_error(caf::sec::runtime_error, std::move(why))); };
}

caf::behavior attention_shard::make_behavior() {
  return {
    [this](admit_request& request) { admit(std::move(request)); },
    [this](cancel_atom, std::uint64_t id) { cancel(id); },
    [this](plan_update& update) { next_plan_ = update.plan; },  // start_step applies it
    [this](step_atom) { start_step(); },
    [this](policy_atom, caf::actor& policy) { policy_ = std::move(policy); },
    [this](queue_atom, std::uint32_t device_idx, caf::actor& queue) {
      if (device_idx < queues_.size())
        queues_[device_idx] = std::move(queue);
    },
    [this](replay_atom, std::uint32_t device_idx) { replay_a2e(device_idx); },
    [this](attention_done_atom, std::uint64_t step, std::uint32_t mb) {
      if (step == step_)
        on_attention_done(mb);
    },
    [this](side_done_atom, std::uint64_t step, std::uint32_t mb) {
      if (step == step_)
        on_side_done(mb);
    },
    [this](final_done_atom, std::uint64_t step, std::uint32_t mb, std::vector<std::int32_t>& tokens,
           std::vector<std::vector<float>>& logits, std::vector<token_logprobs>& logprobs) {
      if (step == step_)
        on_final_done(mb, std::move(tokens), std::move(logits), std::move(logprobs));
    },
    [this](expert_outputs& out) {
      ctx_->stats->note_mailbox(runtime_stats::mailbox_kind::shard, mailbox_size(*this));
      if (!(ctx_->link && ctx_->link->fetch(this, out)))  // rows by UCX come back completed
        on_expert_outputs(out);
    },
    // An A2E the fault injector held back (reorder, delay).
    [this](fault_release_atom, const caf::actor& dest, routed_tokens& msg) {
      transmit(this, ctx_, dest, std::move(msg));
    },
    [this](retransmit_atom, std::uint32_t mb, std::int64_t due_ns) { on_retransmit_timer(mb, due_ns); },
  };
}

void attention_shard::admit(admit_request request) {
  std::uint64_t id = request.request_id;
  std::vector<std::int32_t> replayed = std::move(request.replayed);
  sequences_.emplace(id, sequence{std::move(request), model::kv_cache{ctx_->config, device_->backend()},
                                  std::move(replayed), false});
  order_.push_back(id);
  if (!step_running_)
    send(this, step_atom::value);
}

void attention_shard::cancel(std::uint64_t request_id) {
  auto it = sequences_.find(request_id);
  if (it == sequences_.end())
    return;
  it->second.cancelled = true;
  if (!step_running_)
    send(this, step_atom::value);
}

void attention_shard::finish_request(std::uint64_t id, token_event last) {
  auto it = sequences_.find(id);
  admit_request& req = it->second.request;
  last.admitted = req.admitted;
  send(ingress_, request_ended{id, std::uint64_t(req.kv_tokens()), std::move(last), std::move(req.sink)});
  sequences_.erase(it);
  order_.erase(std::find(order_.begin(), order_.end(), id));
}

void attention_shard::start_step() {
  if (step_running_)
    return;
  plan_ = next_plan_;
  std::vector<std::uint64_t> cancelled;
  for (std::uint64_t id : order_)
    if (sequences_.at(id).cancelled)
      cancelled.push_back(id);
  for (std::uint64_t id : cancelled)
    finish_request(id, end_event(id, sequences_.at(id).generated.size(), finish_reason::cancelled,
                                 request_error::none, {}));
  if (order_.empty())
    return;

  // Continuous batching: every live sequence takes part; new ones feed their whole prompt.
  std::size_t num_sequences = order_.size();
  std::size_t r1 = std::max<std::size_t>(1, plan_.r1);
  std::size_t per_batch = plan_.m_a > 0 ? plan_.m_a : (num_sequences + r1 - 1) / r1;
  ++step_;
  step_running_ = true;
  batches_.clear();
  batches_finished_ = 0;
  std::size_t hidden = std::size_t(ctx_->config.hidden_size);
  std::size_t max_position = 0;
  for (std::size_t first = 0; first < num_sequences; first += per_batch) {
    micro_batch& mb = batches_.emplace_back();
    for (std::size_t s = first; s < std::min(num_sequences, first + per_batch); ++s) {
      std::uint64_t id = order_[s];
      sequence& seq = sequences_.at(id);
      mb.sequence_ids.push_back(id);
      // A new sequence feeds its prompt, and a replayed one its tokens so far too (prefill
      // rebuilds the KV its old shard lost); a running one feeds its last token.
      std::vector<std::int32_t> feed;
      if (seq.prefilling) {
        feed = seq.request.prompt;
        feed.insert(feed.end(), seq.generated.begin(), seq.generated.end());
        // Chunked prefill: the next chunk only. Prompt logits of every row are kept whole.
        std::size_t done = seq.cache.length();
        std::size_t chunk = ctx_->prefill_chunk_tokens;
        std::size_t end = chunk == 0 || seq.request.return_prompt_logits ? feed.size()
                                                                         : std::min(feed.size(), done + chunk);
        feed = std::vector<std::int32_t>(feed.begin() + std::ptrdiff_t(done), feed.begin() + std::ptrdiff_t(end));
        seq.prefilling = end < seq.request.prompt.size() + seq.generated.size();
      } else {
        feed = {seq.generated.back()};
      }
      seq.fed = feed.size();
      seq.cache.grow(feed.size());
      for (std::size_t j = 0; j < feed.size(); ++j) {
        mb.tokens.push_back({&seq.cache, seq.cache.length() + j});
        mb.input_ids.push_back(feed[j]);
      }
      mb.first_rows.push_back(mb.tokens.size() - feed.size());
      mb.last_rows.push_back(mb.tokens.size() - 1);
      max_position = std::max(max_position, seq.cache.length() + feed.size() - 1);
    }
    mb.x = device_->backend().allocate(mb.tokens.size() * hidden * sizeof(float));
  }
  rope_.ensure(max_position);  // no task is in flight between steps
  if (policy_) {
    std::size_t context = 0;
    for (std::uint64_t id : order_)
      context += sequences_.at(id).request.prompt.size() + sequences_.at(id).generated.size() + 1;
    send(policy_, shape_report{shard_idx_, num_sequences, context});
  }
  pump();
}

// Keeps the device fed with up to two segments (the next one queued behind the running one,
// so no round trip leaves it idle). Device tasks run in FIFO order, which is what lets an
// attention-side FFN be queued right behind the attention whose output it reads. In ASAS and
// PPPipe that FFN goes first; in AASS every ready attention does.
void attention_shard::pump() {
  while (step_running_ && in_flight_ < max_in_flight) {
    auto find = [&](auto&& wanted) {
      for (std::size_t i = 0; i < batches_.size(); ++i)
        if (wanted(batches_[i]))
          return i;
      return batches_.size();
    };
    auto side_ready = [](const micro_batch& mb) { return mb.side_pending && !mb.side_running; };
    std::size_t i;
    if (plan_.order != segment_order::aass && (i = find(side_ready)) < batches_.size())
      run_side(i);
    else if ((i = find([](const micro_batch& mb) { return mb.ready_attention; })) < batches_.size())
      run_attention(i);
    else if ((i = find(side_ready)) < batches_.size())
      run_side(i);
    else if ((i = find([](const micro_batch& mb) { return mb.ready_final; })) < batches_.size())
      run_final(i);
    else
      return;
  }
}

void attention_shard::run_attention(std::size_t mb_idx) {
  micro_batch& mb = batches_[mb_idx];
  const model::model_config& c = ctx_->config;
  mb.ready_attention = false;
  ++in_flight_;
  std::size_t layer = mb.layer;
  std::size_t hidden = std::size_t(c.hidden_size);
  // What the combine of the previous layer reads, fixed now: later posts may change the flags.
  std::size_t prev_top_k = mb.top_k;
  bool prev_side = mb.side_valid;
  mb.side_valid = false;
  mb.a2e_sent = false;
  mb.side_pending = model::has_side_ffn(c, layer);
  std::size_t next_top_k = c.sparse_layers[layer] ? std::size_t(c.num_experts_per_tok) : 0;
  auto normed = std::make_shared<row_block>();
  normed->row_floats = hidden;
  normed->data.resize(mb.tokens.size() * hidden);
  // Off host memory the expert input is made on the device and downloaded for A2E (UCX 1.13
  // carries host memory only, and a row block may go to several devices and processes).
  std::shared_ptr<gpu::buffer> normed_dev;
  if (!gpu::holds_host_memory(device_->backend()))
    normed_dev = std::make_shared<gpu::buffer>(device_->backend().allocate(normed->data.size() * sizeof(float)));
  mb.routes.assign(mb.tokens.size() * next_top_k, {});
  caf::actor self = caf::actor_cast<caf::actor>(this);
  std::uint64_t step = step_;
  device_->post("attention L" + std::to_string(layer) + " mb" + std::to_string(mb_idx),
                [this, &mb, layer, normed, normed_dev, self, step, mb_idx, hidden, prev_top_k,
                 prev_side](gpu::backend& backend) {
                  const model::model_config& cfg = ctx_->config;
                  const model::model_weights& w = weights();
                  gpu::buffer staging;  // the E2A rows, uploaded when the backend is not host memory
                  if (layer == 0) {
                    model::embed_step(cfg, w, mb.input_ids, mb.x.floats(), backend);
                  } else {
                    std::vector<const float*> weighted = stage_rows(backend, mb.weighted, hidden, staging);
                    model::combine_step(hidden, prev_top_k, weighted.data(), prev_side ? mb.side.floats() : nullptr,
                                        mb.tokens.size(), mb.x.floats(), backend);
                  }
                  model::attention_step(cfg, w, rope_, layer, mb.tokens, mb.x.floats(), backend);
                  float* normed_out = normed_dev ? normed_dev->floats() : normed->data.data();
                  model::route_step(cfg, w, layer, mb.x.floats(), mb.tokens.size(), normed_out, mb.routes.data(),
                                    backend);
                  if (normed_dev)
                    backend.download(normed->data.data(), normed_out, normed->data.size() * sizeof(float));
                  backend.when_done([self, step, mb_idx, dev = device_] {
                    send_completion(*dev, self, attention_done_atom::value, step, std::uint32_t(mb_idx));
                  });
                },
                exit_on_error());
  mb.normed = normed;
  mb.normed_dev = std::move(normed_dev);
}

void attention_shard::on_attention_done(std::size_t mb_idx) {
  --in_flight_;
  micro_batch& mb = batches_[mb_idx];
  const model::model_config& c = ctx_->config;
  mb.attention_done = true;
  mb.top_k = c.sparse_layers[mb.layer] ? std::size_t(c.num_experts_per_tok) : 0;
  mb.held.clear();
  mb.weighted.assign(mb.tokens.size() * mb.top_k, nullptr);
  mb.outputs_pending = mb.tokens.size() * mb.top_k;
  // PPPipe dispatches after the attention-side FFN, or at once when there is none.
  if (mb.top_k > 0 && (plan_.order != segment_order::pppipe || !mb.side_pending))
    send_a2e(mb_idx);
  maybe_join(mb_idx);
  pump();
}

void attention_shard::run_side(std::size_t mb_idx) {
  micro_batch& mb = batches_[mb_idx];
  mb.side_running = true;
  mb.side_valid = true;
  ++in_flight_;
  std::size_t layer = mb.layer;
  std::size_t side_bytes = mb.tokens.size() * std::size_t(ctx_->config.hidden_size) * sizeof(float);
  if (mb.side.num_bytes() != side_bytes || mb.side.empty())
    mb.side = device_->backend().allocate(side_bytes);
  // The expert input this FFN reads: on the device when the backend is not host memory.
  const float* normed = mb.normed_dev ? mb.normed_dev->floats() : mb.normed->data.data();
  caf::actor self = caf::actor_cast<caf::actor>(this);
  std::uint64_t step = step_;
  device_->post("shared/dense L" + std::to_string(layer) + " mb" + std::to_string(mb_idx),
                [this, &mb, layer, self, step, mb_idx, normed, keep = mb.normed, keep_dev = mb.normed_dev](
                    gpu::backend& backend) {
                  model::side_ffn_step(ctx_->config, weights(), layer, normed, mb.tokens.size(), mb.side.floats(),
                                       backend);
                  backend.when_done([self, step, mb_idx, dev = device_] {
                    send_completion(*dev, self, side_done_atom::value, step, std::uint32_t(mb_idx));
                  });
                },
                exit_on_error());
}

void attention_shard::on_side_done(std::size_t mb_idx) {
  --in_flight_;
  micro_batch& mb = batches_[mb_idx];
  mb.side_pending = false;
  mb.side_running = false;
  if (mb.top_k > 0 && plan_.order == segment_order::pppipe)
    send_a2e(mb_idx);
  maybe_join(mb_idx);
  pump();
}

// One message per (chunk, expert device) carrying every route of that chunk to that device.
void attention_shard::send_a2e(std::size_t mb_idx) {
  micro_batch& mb = batches_[mb_idx];
  std::size_t num_rows = mb.tokens.size();
  std::size_t num_devices = queues_.size();
  std::size_t r2 = plan_.order == segment_order::pppipe ? 1 : std::max<std::size_t>(1, std::min(plan_.r2, num_rows));
  caf::actor self = caf::actor_cast<caf::actor>(this);
  mb.a2e_sent = true;
  for (std::size_t chunk = 0; chunk < r2; ++chunk) {
    std::size_t begin = chunk * num_rows / r2, end = (chunk + 1) * num_rows / r2;
    std::vector<routed_tokens> messages(num_devices);
    for (std::size_t row = begin; row < end; ++row)
      for (std::size_t k = 0; k < mb.top_k; ++k) {
        const model::routed_slot& route = mb.routes[row * mb.top_k + k];
        std::size_t dev = ctx_->device_of(std::size_t(route.expert));
        messages[dev].routes.push_back({std::uint32_t(row), std::uint32_t(row * mb.top_k + k),
                                        std::uint32_t(route.expert), route.weight});
      }
    for (std::size_t dev = 0; dev < num_devices; ++dev) {
      if (messages[dev].routes.empty())
        continue;
      routed_tokens& msg = messages[dev];
      msg.key = {shard_idx_, step_, std::uint32_t(mb_idx), std::uint32_t(mb.layer)};
      msg.chunk = std::uint32_t(chunk);
      msg.rows = mb.normed;
      msg.reply_to = self;
      if (ctx_->trace)
        msg.flow = {ctx_->trace->next_flow_id(), std::chrono::steady_clock::now(), device_->name()};
      ctx_->stats->count_messages(1);
      transport::message_identity id{transport::message_kind::a2e, msg.key.shard, msg.key.step,
                                     msg.key.micro_batch, msg.key.layer, msg.chunk, std::uint32_t(dev), 0, 0};
      transmit_data(this, ctx_, queues_[dev], std::move(msg), id);
    }
  }
  arm_retransmit(mb_idx);
}

// One message per micro-batch: a replay is rare, its batching does not matter (every expert
// row is computed alone, so the outputs are those of the first send, bit for bit).
void attention_shard::replay_a2e(std::size_t device_idx) {
  if (!step_running_ || device_idx >= queues_.size())
    return;
  caf::actor self = caf::actor_cast<caf::actor>(this);
  for (std::size_t mb_idx = 0; mb_idx < batches_.size(); ++mb_idx) {
    micro_batch& mb = batches_[mb_idx];
    if (!mb.a2e_sent || !mb.attention_done || mb.outputs_pending == 0)
      continue;
    routed_tokens msg;
    for (std::size_t slot = 0; slot < mb.weighted.size(); ++slot) {
      const model::routed_slot& route = mb.routes[slot];
      if (mb.weighted[slot] != nullptr || ctx_->device_of(std::size_t(route.expert)) != device_idx)
        continue;
      msg.routes.push_back({std::uint32_t(slot / mb.top_k), std::uint32_t(slot),
                            std::uint32_t(route.expert), route.weight});
    }
    if (msg.routes.empty())
      continue;
    msg.key = {shard_idx_, step_, std::uint32_t(mb_idx), std::uint32_t(mb.layer)};
    msg.rows = mb.normed;
    msg.reply_to = self;
    ctx_->stats->count_messages(1);
    send(queues_[device_idx], std::move(msg));
  }
}

void attention_shard::on_expert_outputs(expert_outputs& out) {
  if (ctx_->faults && ctx_->faults->watches(transport::fault_actor::attention, shard_idx_))
    if (auto kill = ctx_->faults->kill_due(transport::fault_actor::attention, shard_idx_, ++e2a_arrivals_))
      return quit(fault_kill_reason(*kill));
  auto late = [&] {  // of a step or layer that is over: its entries were counted already
    if (ctx_->faults)
      ctx_->faults->count_ignored_e2a(out.slots.size());
  };
  if (out.key.step != step_ || out.key.micro_batch >= batches_.size())
    return late();
  micro_batch& mb = batches_[out.key.micro_batch];
  if (out.key.layer != mb.layer || mb.failed)
    return late();
  if (ctx_->trace && out.flow.id)
    ctx_->trace->flow("E2A", out.flow.id, out.flow.from_track, out.flow.sent, device_->name(),
                      std::chrono::steady_clock::now());
  for (std::size_t i = 0; i < out.slots.size(); ++i) {
    if (mb.weighted[out.slots[i]] != nullptr) {
      if (ctx_->faults)  // a duplicate delivery: the first copy already counted
        ctx_->faults->count_ignored_e2a(1);
      continue;
    }
    mb.weighted[out.slots[i]] = out.rows->row(out.rows_idx[i]);
    --mb.outputs_pending;
  }
  mb.held.push_back(std::move(out.rows));
  maybe_join(out.key.micro_batch);
  pump();
}

void attention_shard::maybe_join(std::size_t mb_idx) {
  micro_batch& mb = batches_[mb_idx];
  if (!mb.attention_done || mb.side_pending || mb.outputs_pending > 0)
    return;
  mb.attention_done = false;
  ++mb.layer;
  if (mb.layer == std::size_t(ctx_->config.num_layers))
    mb.ready_final = true;
  else
    mb.ready_attention = true;
}

void attention_shard::run_final(std::size_t mb_idx) {
  micro_batch& mb = batches_[mb_idx];
  mb.ready_final = false;
  ++in_flight_;
  bool with_side = mb.side_valid;
  std::vector<model::sampling_params> params;
  std::vector<std::uint64_t> ids;
  std::vector<std::size_t> positions;
  std::vector<std::pair<std::size_t, std::size_t>> row_ranges;  // rows whose logits are needed
  // Per sequence: 0 nothing asked, else 1 + the number of top log-probs (computed on the device).
  std::vector<std::size_t> logprobs_asked;
  std::vector<bool> keep_logits;  // the client gets logits: only then do they leave the task
  for (std::size_t s = 0; s < mb.sequence_ids.size(); ++s) {
    const sequence& seq = sequences_.at(mb.sequence_ids[s]);
    ids.push_back(mb.sequence_ids[s]);
    params.push_back(seq.request.sampling);
    positions.push_back(seq.request.prompt.size() + seq.generated.size());
    bool every_prompt_row = seq.request.return_prompt_logits && seq.generated.empty();
    if (seq.prefilling)  // a chunk before the prompt's last: nothing to sample yet
      row_ranges.emplace_back(mb.last_rows[s], mb.last_rows[s]);
    else
      row_ranges.emplace_back(every_prompt_row ? mb.first_rows[s] : mb.last_rows[s], mb.last_rows[s] + 1);
    logprobs_asked.push_back(seq.request.wants_logprobs() ? 1 + seq.request.top_logprobs : 0);
    keep_logits.push_back(seq.request.return_logits || every_prompt_row);
  }
  caf::actor self = caf::actor_cast<caf::actor>(this);
  std::uint64_t step = step_;
  device_->post("lm_head mb" + std::to_string(mb_idx), [this, &mb, self, step, mb_idx, params, ids, positions,
                                                         row_ranges, logprobs_asked, keep_logits,
                                                         with_side](gpu::backend& backend) {
    const model::model_config& c = ctx_->config;
    std::size_t hidden = std::size_t(c.hidden_size);
    std::size_t vocab = std::size_t(c.vocab_size);
    gpu::buffer staging;  // the E2A rows, uploaded when the backend is not host memory
    std::vector<const float*> weighted = stage_rows(backend, mb.weighted, hidden, staging);
    model::combine_step(hidden, mb.top_k, weighted.data(), with_side ? mb.side.floats() : nullptr, mb.tokens.size(),
                        mb.x.floats(), backend);
    std::size_t num_rows = 0;
    for (auto [begin, end] : row_ranges)
      num_rows += end - begin;
    gpu::buffer rows = backend.allocate(num_rows * hidden * sizeof(float));
    std::size_t at = 0;
    for (auto [begin, end] : row_ranges) {
      backend.copy_rows(mb.x.floats() + begin * hidden, hidden, rows.floats() + at * hidden, hidden, end - begin, hidden);
      at += end - begin;
    }
    // Logits and sampling stay on the host at the actor boundary: downloaded when the
    // backend's memory is not host memory.
    std::vector<float> logits(num_rows * vocab);
    if (num_rows == 0) {
      // Every sequence of the micro-batch is mid-prefill: nothing to sample.
    } else if (gpu::holds_host_memory(backend)) {
      model::logits_step(c, weights(), rows.floats(), num_rows, logits.data(), backend);
    } else {
      gpu::buffer logits_dev = backend.allocate(logits.size() * sizeof(float));
      model::logits_step(c, weights(), rows.floats(), num_rows, logits_dev.floats(), backend);
      backend.download(logits.data(), logits_dev.floats(), logits.size() * sizeof(float));
    }
    std::vector<std::int32_t> tokens;
    // Its logits rows (the last one drew the token), only when the client asked for logits.
    std::vector<std::vector<float>> per_sequence(ids.size());
    std::vector<token_logprobs> logprobs(ids.size());  // empty unless asked
    const float* next = logits.data();
    for (std::size_t s = 0; s < ids.size(); ++s) {
      std::size_t count = (row_ranges[s].second - row_ranges[s].first) * vocab;
      if (count == 0) {  // still prefilling
        tokens.push_back(-1);
        continue;
      }
      std::span<const float> drawn_from{next + count - vocab, vocab};
      tokens.push_back(model::sample(drawn_from, params[s], ids[s], positions[s]));
      if (logprobs_asked[s] > 0)
        logprobs[s] = log_softmax_of(drawn_from, tokens.back(), logprobs_asked[s] - 1);
      if (keep_logits[s])
        per_sequence[s].assign(next, next + count);
      next += count;
    }
    send_completion(*device_, self, final_done_atom::value, step, std::uint32_t(mb_idx), std::move(tokens),
                   std::move(per_sequence), std::move(logprobs));
  }, exit_on_error());
}

void attention_shard::on_final_done(std::size_t mb_idx, std::vector<std::int32_t> tokens,
                                    std::vector<std::vector<float>> logits, std::vector<token_logprobs> logprobs) {
  --in_flight_;
  micro_batch& mb = batches_[mb_idx];
  for (std::size_t s = 0; s < mb.sequence_ids.size(); ++s) {
    std::uint64_t id = mb.sequence_ids[s];
    sequence& seq = sequences_.at(id);
    seq.cache.advance(seq.fed);
    if (tokens[s] < 0)  // a prefill chunk: the prompt goes on next step
      continue;
    seq.generated.push_back(tokens[s]);
    const std::vector<std::int32_t>& stops = seq.request.stop_token_ids;
    bool stop = std::binary_search(stops.begin(), stops.end(), tokens[s]);
    bool last = stop || seq.generated.size() >= seq.request.max_new_tokens;
    ctx_->stats->count_tokens(1);
    token_event event;
    event.request_id = id;
    event.token = tokens[s];
    event.index = seq.generated.size() - 1;
    event.last = last;
    if (last)
      event.finish = stop ? finish_reason::stop : finish_reason::length;
    if (seq.request.wants_logprobs()) {
      token_logprobs& lp = logprobs[s];
      event.logprob = lp.logprob;
      for (std::size_t i = 0; i < lp.top_tokens.size(); ++i)
        event.top_logprobs.emplace_back(lp.top_tokens[i], lp.top_logprobs[i]);
    }
    std::vector<float>& rows = logits[s];
    std::size_t vocab = std::size_t(ctx_->config.vocab_size);
    if (seq.request.return_logits)
      event.logits.assign(rows.end() - std::ptrdiff_t(vocab), rows.end());
    if (seq.request.return_prompt_logits && seq.generated.size() == 1)
      event.prompt_logits = std::move(rows);
    if (seq.request.delivered) {
      std::lock_guard<std::mutex> guard{seq.request.delivered->mutex};
      seq.request.delivered->tokens.push_back(tokens[s]);
    }
    if (last)
      finish_request(id, std::move(event));
    else if (seq.request.sink)
      (*seq.request.sink)(std::move(event));
    else  // a shard in another process: the ingress holds the client's sink
      send(ingress_, std::move(event));
  }
  if (++batches_finished_ == batches_.size()) {
    step_running_ = false;
    batches_.clear();
    send(this, step_atom::value);
    return;
  }
  pump();
}

// -- at-least-once A2E/E2A (with a fault plan) -----------------------------------------

void attention_shard::arm_retransmit(std::size_t mb_idx) {
  if (!ctx_->faults)
    return;
  micro_batch& mb = batches_[mb_idx];
  const transport::fault_plan& plan = ctx_->faults->plan();
  // Doubling from retransmit_ms, at most retransmit_max_ms.
  double ms = plan.retransmit_ms;
  for (std::uint32_t i = 0; i < mb.retransmits && ms < plan.retransmit_max_ms; ++i)
    ms *= 2;
  ms = std::min(ms, plan.retransmit_max_ms);
  mb.pending_at_arm = mb.outputs_pending;
  mb.retransmit_armed = true;
  mb.armed_layer = mb.layer;
  mb.retransmit_due = std::chrono::steady_clock::now() + std::chrono::microseconds(std::int64_t(ms * 1000.0));
  ensure_timer(mb_idx, mb.retransmit_due);
}

void attention_shard::ensure_timer(std::size_t mb_idx, std::chrono::steady_clock::time_point due) {
  using clock = std::chrono::steady_clock;
  if (timer_due_.size() <= mb_idx)
    timer_due_.resize(mb_idx + 1, clock::time_point::max());
  if (timer_due_[mb_idx] <= due)
    return;  // the one in flight fires first and re-arms for `due`
  timer_due_[mb_idx] = due;
  ctx_->stats->count_retransmit_timer();
  auto now = clock::now();
  delayed_send(this, std::chrono::duration_cast<std::chrono::microseconds>(std::max(due - now, clock::duration{0})),
               retransmit_atom::value, std::uint32_t(mb_idx),
               std::int64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(due.time_since_epoch()).count()));
}

void attention_shard::on_retransmit_timer(std::uint32_t mb_idx, std::int64_t due_ns) {
  using clock = std::chrono::steady_clock;
  if (mb_idx < timer_due_.size() &&
      std::chrono::duration_cast<std::chrono::nanoseconds>(timer_due_[mb_idx].time_since_epoch()).count() == due_ns)
    timer_due_[mb_idx] = clock::time_point::max();  // the earliest in flight fired
  if (!step_running_ || mb_idx >= batches_.size())
    return;
  micro_batch& mb = batches_[mb_idx];
  if (!mb.retransmit_armed)
    return;
  if (clock::now() < mb.retransmit_due) {  // armed again since (a later layer, step or attempt)
    ensure_timer(mb_idx, mb.retransmit_due);
    return;
  }
  mb.retransmit_armed = false;
  std::size_t layer = mb.armed_layer;
  // Stale: the layer joined, or the micro-batch failed.
  if (mb.layer != layer || mb.failed || !mb.attention_done || mb.outputs_pending == 0)
    return;
  if (mb.outputs_pending < mb.pending_at_arm) {
    // Outputs are still coming in: a slow device, not a lost message. Wait as long again.
    arm_retransmit(mb_idx);
    return;
  }
  if (mb.retransmits >= ctx_->faults->plan().max_retransmits) {
    if (mb.side_running) {  // its task reads the micro-batch: end it once that is done
      arm_retransmit(mb_idx);
      return;
    }
    std::string devices;
    std::vector<bool> silent(queues_.size(), false);
    for (std::size_t slot = 0; slot < mb.weighted.size(); ++slot)
      if (mb.weighted[slot] == nullptr)
        silent[ctx_->device_of(std::size_t(mb.routes[slot].expert))] = true;
    std::string kills;
    for (std::size_t d = 0; d < silent.size(); ++d)
      if (silent[d]) {
        devices += (devices.empty() ? "" : ", ") + std::to_string(d);
        for (auto actor : {transport::fault_actor::expert, transport::fault_actor::queue}) {
          std::string k = ctx_->faults->kills_text(actor, std::uint32_t(d));
          if (!k.empty())
            kills += (kills.empty() ? "" : "; ") + k;
        }
      }
    fail_micro_batch(mb_idx, "expert device(s) " + devices + " did not answer layer " + std::to_string(layer) +
                                 " of attention shard " + std::to_string(shard_idx_) + " after " +
                                 std::to_string(mb.retransmits) + " retransmissions" +
                                 (kills.empty() ? std::string{} : " (" + kills + ")"));
    return;
  }
  ++mb.retransmits;
  resend_missing(mb_idx, mb.retransmits);
  arm_retransmit(mb_idx);
}

// One message per expert device with every route whose output is missing, through the fault
// seam again (a retransmission may be lost too: it draws afresh, its attempt differs).
void attention_shard::resend_missing(std::size_t mb_idx, std::uint32_t attempt) {
  micro_batch& mb = batches_[mb_idx];
  std::vector<routed_tokens> messages(queues_.size());
  for (std::size_t slot = 0; slot < mb.weighted.size(); ++slot) {
    if (mb.weighted[slot] != nullptr)
      continue;
    const model::routed_slot& route = mb.routes[slot];
    messages[ctx_->device_of(std::size_t(route.expert))].routes.push_back(
        {std::uint32_t(slot / mb.top_k), std::uint32_t(slot), std::uint32_t(route.expert),
         route.weight});
  }
  caf::actor self = caf::actor_cast<caf::actor>(this);
  std::uint64_t sent = 0;
  for (std::size_t dev = 0; dev < messages.size(); ++dev) {
    routed_tokens& msg = messages[dev];
    if (msg.routes.empty() || !queues_[dev])
      continue;
    msg.key = {shard_idx_, step_, std::uint32_t(mb_idx), std::uint32_t(mb.layer)};
    msg.rows = mb.normed;
    msg.reply_to = self;
    msg.attempt = attempt;
    ++sent;
    transport::message_identity id{transport::message_kind::a2e, msg.key.shard, msg.key.step, msg.key.micro_batch,
                                   msg.key.layer, 0, std::uint32_t(dev), attempt, 0};
    transmit_data(this, ctx_, queues_[dev], std::move(msg), id);
  }
  ctx_->faults->count_retransmits(sent);
}

// Ends every request of the micro-batch with `why` and counts the micro-batch as done, so the
// step goes on for the others. No task of it is queued or running (the caller checked).
void attention_shard::fail_micro_batch(std::size_t mb_idx, const std::string& why) {
  micro_batch& mb = batches_[mb_idx];
  mb.failed = true;
  mb.attention_done = false;
  ctx_->faults->count_failed_batch();
  for (std::uint64_t id : mb.sequence_ids)
    if (auto it = sequences_.find(id); it != sequences_.end())
      finish_request(id, end_event(id, it->second.generated.size(), finish_reason::error, request_error::internal,
                                   why));
  if (++batches_finished_ == batches_.size()) {
    step_running_ = false;
    batches_.clear();
    send(this, step_atom::value);
    return;
  }
  pump();
}

}  // namespace moert::actors
