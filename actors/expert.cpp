#include "actors/expert.hpp"
#include "actors/fault_seam.hpp"
#include "actors/tensor_link.hpp"

#include <algorithm>
#include <map>
#include <tuple>

namespace moert::actors {

namespace {

using batch_done_atom = caf::atom_constant<caf::atom("batch_done")>;

// E2A messages of one finished batch, ready to send.
struct finished_batch {
  std::vector<std::pair<caf::actor, expert_outputs>> outputs;
};

}  // namespace

}  // namespace moert::actors

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(moert::actors::finished_batch)

namespace moert::actors {

expert::expert(caf::actor_config& cfg, const runtime_context* ctx, std::size_t device_idx, device* dev,
               caf::actor queue)
    : caf::event_based_actor(cfg),
      ctx_(ctx),
      device_idx_(device_idx),
      device_(dev),
      queue_(std::move(queue)) {}

void expert::on_exit() {  // break handle cycles (see attention_shard::on_exit)
  queue_ = nullptr;
}

caf::behavior expert::make_behavior() {
  pull_if_room();
  return {
    [this](expert_batch& batch) {
      pull_pending_ = false;
      ++in_flight_;
      run(batch);
      pull_if_room();
    },
    // The μ-queue died and a new one took over: pull from it (a pull to the old one is lost).
    [this](queue_atom, caf::actor& queue) {
      queue_ = std::move(queue);
      pull_pending_ = false;
      pull_if_room();
    },
    [this](batch_done_atom, finished_batch& done) {
      --in_flight_;
      for (auto& [dest, out] : done.outputs) {
        if (ctx_->trace)
          out.flow = {ctx_->trace->next_flow_id(), std::chrono::steady_clock::now(), device_->name()};
        ctx_->stats->count_messages(1);
        transport::message_identity id{transport::message_kind::e2a, out.key.shard, out.key.step,
                                       out.key.micro_batch, out.key.layer, 0, std::uint32_t(device_idx_),
                                       out.attempt, out.slots.empty() ? 0 : out.slots.front()};
        transmit_data(this, ctx_, dest, std::move(out), id);
      }
      pull_if_room();
    },
    // An E2A the fault injector held back (reorder, delay).
    [this](fault_release_atom, const caf::actor& dest, expert_outputs& out) {
      transmit(this, ctx_, dest, std::move(out));
    },
  };
}

void expert::pull_if_room() {
  if (pull_pending_ || in_flight_ >= max_in_flight)
    return;
  pull_pending_ = true;
  send(queue_, pull_atom::value);
}

void expert::run(expert_batch& batch) {
  std::size_t num_rows = batch.items.size();
  std::vector<std::tuple<std::uint32_t, std::uint64_t>> waves;
  for (const queued_row& item : batch.items)
    waves.emplace_back(item.key.shard, item.key.step);
  ctx_->stats->record_expert_batch(batch.layer, num_rows, waves);
  caf::actor self = caf::actor_cast<caf::actor>(this);
  std::size_t global = ctx_->global_expert(device_idx_, batch.local_expert);
  device_->post("expert L" + std::to_string(batch.layer) + " E" + std::to_string(global) + " x" +
                    std::to_string(num_rows),
                [this, self, global, batch = std::move(batch)](gpu::backend& backend) {
                  std::size_t hidden = std::size_t(ctx_->config.hidden_size);
                  std::size_t n = batch.items.size();
                  std::vector<float> in(n * hidden), out(n * hidden);
                  for (std::size_t r = 0; r < n; ++r)  // the re-batching gather
                    std::copy_n(batch.items[r].rows->row(batch.items[r].row), hidden, in.data() + r * hidden);
                  const model::model_weights& w = device_->weights() ? *device_->weights() : *ctx_->weights;
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
                  backend.when_done([self, finished] { caf::anon_send(self, batch_done_atom::value, std::move(*finished)); });
                },
                // A failed batch: exit naming it; the supervisor re-creates this expert and
                // the shards replay the batch's rows (or, past the restart limit, end them).
                [self](std::string why) {
                  exit_with(self, caf::make_error(caf::sec::runtime_error, std::move(why)));
                });
}

}  // namespace moert::actors
