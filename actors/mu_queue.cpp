#include "actors/mu_queue.hpp"
#include "actors/device.hpp"
#include "actors/fault_seam.hpp"
#include "actors/mailbox_size.hpp"
#include "actors/tensor_link.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <numeric>

namespace moert::actors {

namespace {
constexpr std::size_t npos = std::size_t(-1);
}  // namespace

mu_queue::mu_queue(caf::actor_config& cfg, const runtime_context* ctx, std::size_t device_idx,
                   scheduler_update scheduler, std::string track, std::map<std::uint32_t, caf::actor> experts)
    : caf::event_based_actor(cfg),
      ctx_(ctx),
      device_idx_(device_idx),
      matrix_(std::size_t(ctx->config.num_layers), 0),
      scheduler_(std::move(scheduler)),
      experts_(std::move(experts)),
      track_(std::move(track)) {
  rehost(ctx->hosted_by(device_idx));
  if (device_idx < ctx->expert_devices.size() && ctx->expert_devices[device_idx])
    max_in_flight_ = in_flight_per_lane * ctx->expert_devices[device_idx]->lanes();
}

std::chrono::nanoseconds mu_queue::now() const {
  return std::chrono::steady_clock::now().time_since_epoch();
}

void mu_queue::on_exit() {  // break handle cycles (see attention_shard::on_exit)
  experts_.clear();
  peers_.clear();
  queues_.clear();
  held_.clear();
  bundles_.clear();
}

std::size_t mu_queue::slot_of(std::uint32_t expert) const {
  auto it = std::lower_bound(hosted_.begin(), hosted_.end(), expert);
  return it != hosted_.end() && *it == expert ? std::size_t(it - hosted_.begin()) : npos;
}

caf::behavior mu_queue::make_behavior() {
  auto done = [this](std::uint32_t expert, bundled_rows* rows) {
    auto it = handed_.find(expert);
    // A done of an actor that was replaced since: its batches were counted off then (and its
    // bundled rows taken off their bundles).
    if (it == handed_.end() || it->second.to != caf::actor_cast<caf::actor_addr>(current_sender()))
      return;
    if (rows)
      on_bundled(it->second, *rows);
    --in_flight_;
    if (--it->second.count == 0) {
      lose_bundled(it->second);  // none left with no batch in flight; never strand a bundle
      handed_.erase(it);
    }
    dispatch();
  };
  return {
    [this](routed_tokens& msg) {
      ctx_->stats->note_mailbox(runtime_stats::mailbox_kind::queue, mailbox_size(*this));
      if (!(ctx_->link && ctx_->link->fetch(this, msg)))  // rows by UCX come back completed
        enqueue(msg);
    },
    [done](expert_done_atom, std::uint32_t expert) { done(expert, nullptr); },
    [done](expert_done_atom, std::uint32_t expert, bundled_rows& rows) { done(expert, &rows); },
    // A bundle's E2A the fault injector held back (reorder, delay).
    [this](fault_release_atom, const caf::actor& dest, expert_outputs& out) {
      transmit(this, ctx_, dest, std::move(out));
    },
    [this](scheduler_update& update) { scheduler_ = update; },
    // The expert's actor died and this one replaces it: what the old one had is lost (the
    // shards replay it), so it no longer counts against the device.
    [this](expert_atom, std::uint32_t expert, caf::actor& actor) {
      if (auto it = handed_.find(expert); it != handed_.end()) {
        in_flight_ -= it->second.count;
        lose_bundled(it->second);
        handed_.erase(it);
      }
      if (slot_of(expert) != npos)
        experts_[expert] = std::move(actor);
      dispatch();
    },
    [this](adopt_expert_atom, std::uint32_t expert, caf::actor& actor) {
      if (slot_of(expert) == npos) {
        std::vector<std::uint32_t> hosted = hosted_;
        hosted.insert(std::lower_bound(hosted.begin(), hosted.end(), expert), expert);
        rehost(std::move(hosted));
      }
      experts_[expert] = std::move(actor);
      std::vector<routed_tokens> held = std::move(held_);
      held_.clear();
      for (routed_tokens& msg : held)
        enqueue(msg);
      dispatch();
    },
    [this](hand_off_atom, std::uint32_t expert) {
      std::size_t slot = slot_of(expert);
      if (slot == npos)
        return;
      std::vector<queued_row> rows;
      for (std::size_t layer = 0; layer < matrix_.num_layers(); ++layer) {
        auto& queue = queues_[layer * hosted_.size() + slot];
        rows.insert(rows.end(), std::make_move_iterator(queue.begin()), std::make_move_iterator(queue.end()));
        queue.clear();
      }
      std::vector<std::uint64_t> left;  // bundles they leave: the device they go to bundles them anew
      for (queued_row& row : rows)
        if (row.bundle != 0)
          left.push_back(std::exchange(row.bundle, 0));
      std::vector<std::uint32_t> hosted = hosted_;
      hosted.erase(hosted.begin() + std::ptrdiff_t(slot));
      rehost(std::move(hosted));
      experts_.erase(expert);  // its batches in flight here still count (handed_)
      forward(std::move(rows), expert);
      for (std::uint64_t id : left)
        settle(id, 1);
      dispatch();
    },
    [this](peers_atom, std::vector<caf::actor>& queues) { peers_ = std::move(queues); },
  };
}

void mu_queue::rehost(std::vector<std::uint32_t> hosted) {
  std::size_t num_layers = std::size_t(ctx_->config.num_layers), n = hosted.size();
  std::vector<std::deque<queued_row>> queues(num_layers * n);
  policy::queue_matrix matrix{num_layers, n};
  for (std::size_t j = 0; j < n; ++j) {
    std::size_t old = slot_of(hosted[j]);
    if (old == npos)
      continue;
    for (std::size_t layer = 0; layer < num_layers; ++layer) {
      queues[layer * n + j] = std::move(queues_[layer * hosted_.size() + old]);
      matrix.set(layer, j, matrix_.tokens(layer, old), matrix_.oldest(layer, old));
    }
  }
  hosted_ = std::move(hosted);
  queues_ = std::move(queues);
  matrix_ = std::move(matrix);
}

void mu_queue::enqueue(routed_tokens& msg) {
  if (ctx_->faults && fault_kills())
    return;
  auto arrived = now();
  if (ctx_->trace && msg.flow.id) {
    ctx_->trace->flow("A2E", msg.flow.id, msg.flow.from_track, msg.flow.sent, track_, std::chrono::steady_clock::now());
    msg.flow.id = 0;  // a held or forwarded part is not a second arrival
  }
  std::size_t n = hosted_.size();
  // A shard in another process gets this A2E's outputs as one E2A (mu_queue.hpp).
  std::uint64_t bundle_id = msg.reply_to && msg.reply_to.node() != node() ? ++next_bundle_ : 0;
  std::size_t bundled = 0;
  std::map<std::size_t, routed_tokens> away;  // by device: rows of experts hosted elsewhere
  for (const route_entry& route : msg.routes) {
    if (route.expert >= std::uint32_t(ctx_->config.num_experts)) {
      spdlog::error("{}: A2E names expert {} of a model with {}; dropped", track_, route.expert,
                    ctx_->config.num_experts);
      continue;
    }
    std::size_t slot = slot_of(route.expert);
    if (slot == npos) {
      away[ctx_->device_of(route.expert)].routes.push_back(route);
      continue;
    }
    std::size_t q = msg.key.layer * n + slot;
    if (queues_[q].empty())
      matrix_.set(msg.key.layer, slot, 0, arrived);
    queues_[q].push_back(
        {msg.rows, route.row, route.slot, route.weight, msg.key, msg.reply_to, msg.attempt, bundle_id});
    bundled += bundle_id != 0;
    matrix_.set(msg.key.layer, slot, queues_[q].size(), matrix_.oldest(msg.key.layer, slot));
  }
  if (bundled > 0) {
    bundle& b = bundles_[bundle_id];
    b.key = msg.key;
    b.reply_to = msg.reply_to;
    b.attempt = msg.attempt;
    b.pending = bundled;
    b.rows = std::make_shared<row_block>();
    b.rows->row_floats = std::size_t(ctx_->config.hidden_size);
    b.rows->data.reserve(bundled * b.rows->row_floats);
    b.last_sent = std::chrono::steady_clock::now();
  }
  for (auto& [dev, part] : away) {
    part.key = msg.key;
    part.chunk = msg.chunk;
    part.rows = msg.rows;
    part.reply_to = msg.reply_to;
    part.attempt = msg.attempt;
    send_on(dev, std::move(part));
  }
  dispatch();
}

// Rows for experts that are not (or no longer) served here: held when the expert is placed
// here but its adoption is not in yet (the supervisor sent the adoption first), else sent to
// the μ-queue of the device the placement names.
void mu_queue::send_on(std::size_t dev, routed_tokens part) {
  if (dev == device_idx_) {
    held_.push_back(std::move(part));
  } else if (dev < peers_.size() && peers_[dev]) {
    ctx_->stats->count_messages(1);
    ctx_->stats->count_forwarded(part.routes.size());
    send(peers_[dev], std::move(part));
  } else {
    spdlog::error("{}: rows of layer {} for expert device {}, which it cannot reach; the shard's retransmission "
                  "or replay must bring them",
                  track_, part.key.layer, dev);
  }
}

// Rows of an expert handed off, to wherever the placement puts it now, one A2E per
// (micro-batch, chunk of rows) as they were queued.
void mu_queue::forward(std::vector<queued_row> rows, std::uint32_t expert) {
  std::vector<routed_tokens> parts;
  for (queued_row& row : rows) {
    auto same = [&](const routed_tokens& m) {
      return m.rows == row.rows && m.reply_to == row.reply_to && m.attempt == row.attempt &&
             m.key.shard == row.key.shard && m.key.step == row.key.step &&
             m.key.micro_batch == row.key.micro_batch && m.key.layer == row.key.layer;
    };
    auto it = std::find_if(parts.begin(), parts.end(), same);
    if (it == parts.end()) {
      routed_tokens& m = parts.emplace_back();
      m.key = row.key;
      m.rows = row.rows;
      m.reply_to = row.reply_to;
      m.attempt = row.attempt;
      it = parts.end() - 1;
    }
    it->routes.push_back({row.row, row.slot, expert, row.weight});
  }
  for (routed_tokens& part : parts) {
    part.flow = {};
    send_on(ctx_->device_of(expert), std::move(part));
  }
}

void mu_queue::dispatch() {
  while (in_flight_ < max_in_flight_) {
    auto choice = policy::pick_queue(matrix_, scheduler_.policy, scheduler_.params, now());
    if (!choice)
      return;
    std::uint32_t expert = hosted_[choice->expert];
    auto actor = experts_.find(expert);
    if (actor == experts_.end())
      return;  // its actor is being re-created: the replacement's arrival dispatches again
    std::size_t q = choice->layer * hosted_.size() + choice->expert;
    expert_batch batch;
    batch.layer = std::uint32_t(choice->layer);
    batch.expert = expert;
    batch.device = std::uint32_t(device_idx_);
    batch.items.assign(std::make_move_iterator(queues_[q].begin()), std::make_move_iterator(queues_[q].end()));
    queues_[q].clear();
    matrix_.set(choice->layer, choice->expert, 0);
    handed& h = handed_[expert];
    if (h.to != actor->second.address()) {
      in_flight_ -= h.count;  // the old actor's dones are ignored
      lose_bundled(h);
      h = {actor->second.address(), 0, {}};
    }
    ++h.count;
    for (const queued_row& item : batch.items)
      if (item.bundle != 0)
        ++h.bundled[item.bundle];
    ++in_flight_;
    ctx_->stats->count_messages(1);
    send(actor->second, std::move(batch));
  }
}

void mu_queue::on_bundled(handed& h, bundled_rows& rows) {
  if (rows.bundles.size() != rows.slots.size() || rows.rows_idx.size() != rows.slots.size() || !rows.rows)
    return;  // a programming error; lose_bundled settles them with the batch
  for (std::size_t i = 0; i < rows.slots.size(); ++i) {
    std::uint64_t id = rows.bundles[i];
    auto in_flight = h.bundled.find(id);
    if (in_flight == h.bundled.end())
      continue;  // taken off already
    if (--in_flight->second == 0)
      h.bundled.erase(in_flight);
    if (auto it = bundles_.find(id); it != bundles_.end()) {
      const float* row = rows.rows->row(rows.rows_idx[i]);
      it->second.rows->data.insert(it->second.rows->data.end(), row, row + rows.rows->row_floats);
      it->second.slots.push_back(rows.slots[i]);
    }
    settle(id, 1);
  }
}

void mu_queue::lose_bundled(handed& h) {
  auto lost = std::move(h.bundled);
  h.bundled.clear();
  for (const auto& [id, count] : lost)
    settle(id, count);
}

void mu_queue::settle(std::uint64_t id, std::size_t count) {
  auto it = bundles_.find(id);
  if (it == bundles_.end())
    return;
  bundle& b = it->second;
  b.pending -= std::min(b.pending, count);
  if (b.pending > 0) {
    if (!ctx_->faults || b.slots.empty())
      return;
    auto now = std::chrono::steady_clock::now();
    auto half_interval = std::chrono::microseconds(std::int64_t(ctx_->faults->plan().retransmit_ms * 500.0));
    if (now - b.last_sent >= half_interval) {
      std::size_t row_floats = b.rows->row_floats;
      send_bundle(b);
      b.rows = std::make_shared<row_block>();
      b.rows->row_floats = row_floats;
      b.last_sent = now;
    }
    return;
  }
  bundle full = std::move(b);
  bundles_.erase(it);
  if (!full.slots.empty())  // else every row left or was lost: the shard asks again
    send_bundle(full);
}

void mu_queue::send_bundle(bundle& b) {
  expert_outputs out;
  out.key = b.key;
  out.attempt = b.attempt;
  out.rows_idx.resize(b.slots.size());
  std::iota(out.rows_idx.begin(), out.rows_idx.end(), std::uint32_t{0});
  std::sort(out.rows_idx.begin(), out.rows_idx.end(),
            [&](std::uint32_t x, std::uint32_t y) { return b.slots[x] < b.slots[y]; });
  out.slots.reserve(b.slots.size());
  for (std::uint32_t i : out.rows_idx)
    out.slots.push_back(b.slots[i]);
  out.rows = std::move(b.rows);
  b.slots.clear();
  if (ctx_->trace)
    out.flow = {ctx_->trace->next_flow_id(), std::chrono::steady_clock::now(), track_};
  ctx_->stats->count_messages(1);
  auto identity = e2a_identity(out, std::uint32_t(device_idx_));
  transmit_data(this, ctx_, b.reply_to, std::move(out), identity);
}

// The fault plan's kills of this device's experts or μ-queue, counted in A2E messages that
// reached the device. Every expert actor hosted here is told to exit (the supervisor re-creates
// them, or re-places them on other devices, and the shards send their missing rows again); a
// killed μ-queue exits itself, losing what it held.
bool mu_queue::fault_kills() {
  auto dev = std::uint32_t(device_idx_);
  bool watched = ctx_->faults->watches(transport::fault_actor::expert, dev) ||
                 ctx_->faults->watches(transport::fault_actor::queue, dev);
  if (!watched)
    return false;
  ++arrivals_;
  if (!experts_.empty())
    if (auto kill = ctx_->faults->kill_due(transport::fault_actor::expert, dev, arrivals_)) {
      for (auto& [id, actor] : experts_)
        send_exit(actor, fault_kill_reason(*kill));
      experts_.clear();
    }
  if (auto kill = ctx_->faults->kill_due(transport::fault_actor::queue, dev, arrivals_)) {
    quit(fault_kill_reason(*kill));
    return true;
  }
  return false;
}

}  // namespace moert::actors
