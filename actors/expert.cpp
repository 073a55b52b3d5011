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

// E2A messages of one finished batch, ready to send, and the μ-queue to tell.
struct finished_batch {
  std::vector<std::pair<caf::actor, expert_outputs>> outputs;
  caf::actor queue;
  std::uint32_t device = 0;
};

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
      for (auto& [dest, out] : done.outputs) {
        if (ctx_->trace)
          out.flow = {ctx_->trace->next_flow_id(), std::chrono::steady_clock::now(),
                      ctx_->expert_devices[done.device]->name()};
        ctx_->stats->count_messages(1);
        transport::message_identity id{transport::message_kind::e2a, out.key.shard, out.key.step,
                                       out.key.micro_batch, out.key.layer, 0, done.device,
                                       out.attempt, out.slots.empty() ? 0 : out.slots.front()};
        transmit_data(this, ctx_, dest, std::move(out), id);
      }
      // After the outputs: the queue's next batch may not overtake them on the device.
      ctx_->stats->count_control(1);
      send(done.queue, expert_done_atom::value, expert_id_);
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
                  backend.when_done([self, finished, dev] { send_completion(*dev, self, batch_done_atom::value, std::move(*finished)); });
                },
                // A failed batch: exit naming it; the supervisor re-creates this expert and
                // the shards replay the batch's rows (or, past the restart limit, end them).
                [self](std::string why) {
                  exit_with(self, caf::make_error(caf::sec::runtime_error, std::move(why)));
                });
}

}  // namespace moert::actors
