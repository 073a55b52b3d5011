#include "actors/mu_queue.hpp"
#include "actors/fault_seam.hpp"
#include "actors/tensor_link.hpp"

namespace moert::actors {

mu_queue::mu_queue(caf::actor_config& cfg, const runtime_context* ctx, std::size_t device_idx,
                   scheduler_update scheduler, std::string track)
    : caf::event_based_actor(cfg),
      ctx_(ctx),
      device_idx_(device_idx),
      num_local_(ctx->experts_on(device_idx)),
      queues_(std::size_t(ctx->config.num_layers) * num_local_),
      matrix_(std::size_t(ctx->config.num_layers), num_local_),
      scheduler_(std::move(scheduler)),
      track_(std::move(track)) {}

std::chrono::nanoseconds mu_queue::now() const {
  return std::chrono::steady_clock::now().time_since_epoch();
}

void mu_queue::on_exit() {  // break handle cycles (see attention_shard::on_exit)
  expert_ = nullptr;
  queues_.clear();
}

caf::behavior mu_queue::make_behavior() {
  return {
    [this](routed_tokens& msg) {
      if (!(ctx_->link && ctx_->link->fetch(this, msg)))  // rows by UCX come back completed
        enqueue(msg);
    },
    [this](pull_atom) {
      expert_ = caf::actor_cast<caf::actor>(current_sender());
      expert_waiting_ = true;
      dispatch();
    },
    [this](scheduler_update& update) { scheduler_ = update; },
    // The expert died: hand nothing to it any more; its replacement announces itself by pulling.
    [this](expert_lost_atom) {
      expert_ = nullptr;
      expert_waiting_ = false;
    },
  };
}

void mu_queue::enqueue(routed_tokens& msg) {
  if (ctx_->faults && fault_kills())
    return;
  auto arrived = now();
  if (ctx_->trace && msg.flow.id)
    ctx_->trace->flow("A2E", msg.flow.id, msg.flow.from_track, msg.flow.sent, track_, std::chrono::steady_clock::now());
  for (const route_entry& route : msg.routes) {
    std::size_t q = msg.key.layer * num_local_ + route.local_expert;
    if (queues_[q].empty())
      matrix_.set(msg.key.layer, route.local_expert, 0, arrived);
    queues_[q].push_back({msg.rows, route.row, route.slot, route.weight, msg.key, msg.reply_to, msg.attempt});
    matrix_.set(msg.key.layer, route.local_expert, queues_[q].size(), matrix_.oldest(msg.key.layer, route.local_expert));
  }
  dispatch();
}

void mu_queue::dispatch() {
  if (!expert_waiting_)
    return;
  auto choice = policy::pick_queue(matrix_, scheduler_.policy, scheduler_.params, now());
  if (!choice)
    return;
  std::size_t q = choice->layer * num_local_ + choice->expert;
  expert_batch batch;
  batch.layer = std::uint32_t(choice->layer);
  batch.local_expert = std::uint32_t(choice->expert);
  batch.items.assign(std::make_move_iterator(queues_[q].begin()), std::make_move_iterator(queues_[q].end()));
  queues_[q].clear();
  matrix_.set(choice->layer, choice->expert, 0);
  expert_waiting_ = false;
  ctx_->stats->count_messages(1);
  send(expert_, std::move(batch));
}


// The fault plan's kills of this device's expert or μ-queue, counted in A2E messages that
// reached the device. The expert is told to exit (its supervisor re-creates it, and the
// shards send its missing rows again); a killed μ-queue exits itself, losing what it held.
bool mu_queue::fault_kills() {
  auto dev = std::uint32_t(device_idx_);
  bool watched = ctx_->faults->watches(transport::fault_actor::expert, dev) ||
                 ctx_->faults->watches(transport::fault_actor::queue, dev);
  if (!watched)
    return false;
  ++arrivals_;
  if (expert_)
    if (auto kill = ctx_->faults->kill_due(transport::fault_actor::expert, dev, arrivals_)) {
      send_exit(expert_, fault_kill_reason(*kill));
      expert_ = nullptr;
      expert_waiting_ = false;
    }
  if (auto kill = ctx_->faults->kill_due(transport::fault_actor::queue, dev, arrivals_)) {
    quit(fault_kill_reason(*kill));
    return true;
  }
  return false;
}

}  // namespace moert::actors
