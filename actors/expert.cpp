#include "actors/expert.hpp"
#include "actors/completion.hpp"
#include "actors/fault_seam.hpp"
#include "actors/mailbox_size.hpp"
#include "actors/tensor_link.hpp"

#include <algorithm>
#include <map>
#include <tuple>

namespace moert::actors {

namespace {

using batch_done_atom = caf::atom_constant<caf::atom("batch_done")>;

// E2A messages of one finished batch, ready to send, the outputs of its bundled rows (they go
// back to the μ-queue with the done), and the μ-queue to tell.
struct finished_batch {
  std::vector<std::pair<caf::actor, expert_outputs>> outputs;
  bundled_rows bundled;
  caf::actor queue;
  std::uint32_t device = 0;
};

// The E2A messages of a finished batch through `out`, then the μ-queue's done through `done`
// (after the outputs: the queue's next batch may not overtake them on the device). Any thread
// (an expert's handler, or a task's completion): it only counts and traces.
template <class send_output, class send_done>
void send_outputs(const runtime_context* ctx, finished_batch& batch, send_output&& out, send_done&& done) {
  for (auto& [dest, msg] : batch.outputs) {
    if (ctx->trace)
      msg.flow = {ctx->trace->next_flow_id(), std::chrono::steady_clock::now(),
                  ctx->expert_devices[batch.device]->name()};
    ctx->stats->count_messages(1);
    out(dest, std::move(msg));
  }
  ctx->stats->count_control(1);
  done(batch.queue);
}

}  // namespace

}  // namespace moert::actors

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moert::actors::finished_batch)

namespace moert::actors {

expert::expert(caf::actor_config& cfg, const runtime_context* ctx, std::uint32_t expert_id)
    : caf::event_based_actor(cfg), ctx_(ctx), expert_id_(expert_id) {}

caf::behavior expert::make_behavior() {
  return {
    [this](expert_batch& batch) {
      ctx_->stats->note_mailbox(runtime_stats::mailbox_kind::expert, mailbox_size(*this));
      run(batch, caf::actor_cast<caf::actor>(current_sender()));
    },
    [this](batch_done_atom, finished_batch& done) {
      send_outputs(ctx_, done, [&](const caf::actor& dest, expert_outputs&& out) {
        auto id = e2a_identity(out, done.device);  // before the move: argument order is unspecified
        transmit_data(this, ctx_, dest, std::move(out), id);
      }, [&](const caf::actor& queue) {
        if (done.bundled.slots.empty())
          send(queue, expert_done_atom::value, expert_id_);
        else
          send(queue, expert_done_atom::value, expert_id_, std::move(done.bundled));
      });
    },
    // An E2A the fault injector held back (reorder, delay).
    [this](fault_release_atom, const caf::actor& dest, expert_outputs& out) {
      transmit(this, ctx_, dest, std::move(out));
    },
  };
}

void expert::run(expert_batch& batch, caf::actor queue) {
  std::size_t num_rows = batch.items.size();
  std::vector<std::tuple<std::uint32_t, std::uint64_t>> waves;
  for (const queued_row& item : batch.items)
    waves.emplace_back(item.key.shard, item.key.step);
  ctx_->stats->record_expert_batch(batch.layer, num_rows, waves);
  caf::actor self = caf::actor_cast<caf::actor>(this);
  std::size_t global = batch.expert;
  std::uint32_t dev_idx = batch.device;
  device* dev = dev_idx < ctx_->expert_devices.size() ? ctx_->expert_devices[dev_idx] : nullptr;
  if (!dev || global != expert_id_)  // a programming error: the queue handed what is not ours
    return exit_with(self, caf::make_error(caf::sec::runtime_error,
                                           "expert " + std::to_string(expert_id_) + " got a batch of expert " +
                                               std::to_string(global) + " for device " + std::to_string(dev_idx) +
                                               (dev ? "" : ", which this process does not have")));
  // Concurrent: a device's expert batches are independent, so several run at once, one per lane.
  dev->post_concurrent("expert L" + std::to_string(batch.layer) + " E" + std::to_string(global) + " x" + std::to_string(num_rows),
            [this, self, global, dev, dev_idx, queue = std::move(queue), batch = std::move(batch)](gpu::backend& backend) {
                  std::size_t hidden = std::size_t(ctx_->config.hidden_size);
                  std::size_t n = batch.items.size();
                  std::vector<float> in(n * hidden), out(n * hidden);
                  for (std::size_t r = 0; r < n; ++r)  // the re-batching gather
                    std::copy_n(batch.items[r].rows->row(batch.items[r].row), hidden, in.data() + r * hidden);
                  const model::model_weights& w = dev->weights() ? *dev->weights() : *ctx_->weights;
                  if (gpu::holds_host_memory(backend)) {
                    model::expert_step(w, batch.layer, global, in.data(), n, out.data(), backend);
                  } else {  // A2E rows arrive and E2A rows leave in host memory (UCX 1.13 has no CUDA path)
                    gpu::buffer in_dev = backend.upload_floats(in);
                    gpu::buffer out_dev = backend.allocate(out.size() * sizeof(float));
                    model::expert_step(w, batch.layer, global, in_dev.floats(), n, out_dev.floats(), backend);
                    backend.download(out.data(), out_dev.floats(), out.size() * sizeof(float));
                  }
                  auto weighted = std::make_shared<row_block>();
                  weighted->row_floats = hidden;
                  weighted->data.resize(n * hidden);
                  for (std::size_t r = 0; r < n; ++r)
                    model::weight_row(out.data() + r * hidden, batch.items[r].weight, hidden,
                                      weighted->data.data() + r * hidden);
                  // One E2A message per destination micro-batch, all sharing the output block.
                  std::map<std::tuple<std::uint32_t, std::uint64_t, std::uint32_t>, std::size_t> index;
                  finished_batch done;
                  done.queue = queue;
                  done.device = dev_idx;
                  for (std::size_t r = 0; r < n; ++r) {
                    const queued_row& item = batch.items[r];
                    if (item.bundle != 0) {  // its shard is in another process: the μ-queue sends it
                      if (!done.bundled.rows)
                        done.bundled.rows = weighted;
                      done.bundled.bundles.push_back(item.bundle);
                      done.bundled.rows_idx.push_back(std::uint32_t(r));
                      done.bundled.slots.push_back(item.slot);
                      continue;
                    }
                    auto key = std::make_tuple(item.key.shard, item.key.step, item.key.micro_batch);
                    auto [it, fresh] = index.emplace(key, done.outputs.size());
                    if (fresh) {
                      expert_outputs msg;
                      msg.key = item.key;
                      msg.rows = weighted;
                      done.outputs.emplace_back(item.reply_to, std::move(msg));
                    }
                    expert_outputs& msg = done.outputs[it->second].second;
                    msg.attempt = std::max(msg.attempt, item.attempt);
                    msg.rows_idx.push_back(std::uint32_t(r));
                    msg.slots.push_back(item.slot);
                  }
                  auto finished = std::make_shared<finished_batch>(std::move(done));
                  // With an empty fault plan and no tensor link an E2A is a plain send (or,
                  // by the injector's test hook, a drop): where the device's threads run the
                  // actors (device::completion_unit), the outputs and the μ-queue's done go
                  // from here, in the order the handler sends them, with this actor as their
                  // sender, and this actor is not woken in between (one hop less per batch on
                  // the device's threads, a few µs each). Under CAF's scheduler (its test
                  // coordinator: tests/actors/data_path scripts that hop) the hop stays.
                  bool direct = !ctx_->link && (!ctx_->faults || ctx_->faults->plan().empty()) &&
                                dev->completion_unit(self->home_system()) != nullptr;
                  backend.when_done([ctx = ctx_, id = expert_id_, self, finished, dev, direct] {
                    if (!direct)
                      return send_completion(*dev, self, batch_done_atom::value, std::move(*finished));
                    send_outputs(ctx, *finished, [&](const caf::actor& dest, expert_outputs&& msg) {
                      auto action = ctx->faults ? ctx->faults->decide_and_count(e2a_identity(msg, finished->device)).action
                                                : transport::fault_action::deliver;
                      if (action == transport::fault_action::deliver)
                        send_completion_from(*dev, self, dest, std::move(msg));
                      else if (action != transport::fault_action::drop)  // not from an empty plan: as a reorder
                        send_completion_from(*dev, self, self, fault_release_atom::value, dest, std::move(msg));
                    }, [&](const caf::actor& queue) {
                      if (finished->bundled.slots.empty())
                        send_completion_from(*dev, self, queue, expert_done_atom::value, id);
                      else
                        send_completion_from(*dev, self, queue, expert_done_atom::value, id,
                                             std::move(finished->bundled));
                    });
                  });
                },
                // A failed batch: exit naming it; the supervisor re-creates this expert and
                // the shards replay the batch's rows (or, past the restart limit, end them).
                [self](std::string why) {
                  exit_with(self, caf::make_error(caf::sec::runtime_error, std::move(why)));
                });
}

}  // namespace moert::actors
