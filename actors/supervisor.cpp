#include "actors/supervisor.hpp"

#include "actors/attention_shard.hpp"
#include "actors/census.hpp"
#include "actors/expert.hpp"
#include "actors/mu_queue.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

namespace moert::actors {

supervisor::supervisor(caf::actor_config& cfg, const runtime_context* ctx, supervised_set children,
                       supervision_params params)
    : caf::event_based_actor(cfg),
      ctx_(ctx),
      set_(std::move(children)),
      params_(params),
      expert_restarts_(set_.experts.size()),
      lost_(set_.queues.size(), false) {}

const char* supervisor::name_of(kind what) {
  switch (what) {
    case kind::shard: return "attention shard";
    case kind::queue: return "mu_queue";
    case kind::expert: return "expert";
  }
  return "actor";
}

// Replacements are known only here: they stop with the supervisor (the engine stops the
// originals itself).
void supervisor::on_exit() {
  for (const auto& list : {&set_.shards, &set_.queues, &set_.experts})
    for (const auto& actor : *list)
      if (actor)
        caf::anon_send_exit(actor, caf::exit_reason::user_shutdown);
  set_ = {};
  children_.clear();
}

void supervisor::watch(const caf::actor& actor, kind what, std::size_t idx) {
  children_[actor.address()] = child{what, idx};
  monitor(actor);
}

void supervisor::watch_fresh(const caf::actor& actor, kind what, std::size_t idx) {
  if (ctx_->census)
    ctx_->census->add(actor, std::string{name_of(what)} + " " + std::to_string(idx) + " (re-created)");
  watch(actor, what, idx);
}

caf::behavior supervisor::make_behavior() {
  for (std::size_t i = 0; i < set_.shards.size(); ++i)
    watch(set_.shards[i], kind::shard, i);
  for (std::size_t i = 0; i < set_.queues.size(); ++i)
    watch(set_.queues[i], kind::queue, i);
  for (std::size_t i = 0; i < set_.experts.size(); ++i)
    watch(set_.experts[i], kind::expert, i);
  set_down_handler([this](caf::down_msg& down) { on_down(down); });
  return {
    // Fault injection: the named actor dies as if it had crashed (exit_reason::kill cannot
    // be trapped). Answers false when there is no such actor.
    [this](kill_atom, const std::string& what, std::uint32_t idx) {
      if (what == "expert_device") {  // every expert actor placed on expert device idx
        bool any = false;
        for (std::size_t e = 0; !stopping_ && e < set_.experts.size(); ++e)
          if (ctx_->device_of(e) == idx) {
            caf::anon_send_exit(set_.experts[e], caf::exit_reason::kill);
            any = true;
          }
        return any;
      }
      const std::vector<caf::actor>* list = what == "attention" ? &set_.shards
                                          : what == "queue"     ? &set_.queues
                                          : what == "expert"    ? &set_.experts
                                                                : nullptr;
      if (stopping_ || !list || idx >= list->size())
        return false;
      caf::anon_send_exit((*list)[idx], caf::exit_reason::kill);
      return true;
    },
    [this](move_atom, std::uint32_t expert, std::uint32_t device) { return move(expert, device); },
    [this](caf::get_atom) {
      return caf::make_message(report_.restarts, report_.escalated, report_.last_recovery_us);
    },
  };
}

void supervisor::on_down(const caf::down_msg& down) {
  auto it = children_.find(down.source);
  if (it == children_.end())
    return;
  child who = it->second;
  children_.erase(it);
  if (stopping_) {
    if (downs_pending_ > 0 && --downs_pending_ == 0)
      send(set_.ingress, node_lost_atom::value, escalation_);
    return;
  }
  if (down.reason == caf::exit_reason::user_shutdown || down.reason == caf::exit_reason::normal)
    return;  // the engine is stopping
  std::string why = std::string(name_of(who.what)) + " " + std::to_string(who.idx) + " died (" +
                    system().render(down.reason) + ")";
  auto now = std::chrono::steady_clock::now();
  auto past_intensity = [&](std::deque<std::chrono::steady_clock::time_point>& window) {
    while (!window.empty() && now - window.front() > params_.period)
      window.pop_front();
    if (window.size() >= params_.max_restarts)
      return true;
    window.push_back(now);
    return false;
  };
  if (who.what == kind::expert && past_intensity(expert_restarts_[who.idx])) {
    if (!replace_device(ctx_->device_of(who.idx), why))
      return;
  } else if (who.what != kind::expert && past_intensity(restarts_)) {
    return escalate(why);
  } else {
    restart(who, why);
    ++report_.restarts;
  }
  report_.last_recovery_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - now).count();
}

void supervisor::restart(child who, const std::string& why) {
  spdlog::warn("supervisor: {}; re-created, its work replayed", why);
  std::size_t idx = who.idx;
  switch (who.what) {
    case kind::expert: {
      caf::actor fresh = spawn<expert>(ctx_, std::uint32_t(idx));
      set_.experts[idx] = fresh;
      watch_fresh(fresh, kind::expert, idx);
      // The queue first: the replay's rows land behind the replacement.
      idx = ctx_->device_of(idx);
      send(set_.queues[idx], expert_atom::value, std::uint32_t(who.idx), fresh);
      break;
    }
    case kind::queue: {
      std::map<std::uint32_t, caf::actor> hosted;
      for (std::uint32_t e : ctx_->hosted_by(idx))
        hosted[e] = set_.experts[e];
      caf::actor fresh =
          spawn<mu_queue>(ctx_, idx, set_.scheduler, set_.expert_devices[idx]->name(), std::move(hosted));
      set_.queues[idx] = fresh;
      watch_fresh(fresh, kind::queue, idx);
      for (const auto& queue : set_.queues)
        send(queue, peers_atom::value, set_.queues);
      if (set_.policy)
        send(set_.policy, queue_atom::value, std::uint32_t(idx), fresh);
      for (const auto& shard : set_.shards)
        send(shard, queue_atom::value, std::uint32_t(idx), fresh);
      break;
    }
    case kind::shard: {
      caf::actor fresh = spawn<attention_shard>(ctx_, std::uint32_t(idx), set_.attention_devices[idx], set_.queues,
                                                set_.ingress, set_.plan);
      set_.shards[idx] = fresh;
      watch_fresh(fresh, kind::shard, idx);
      if (set_.policy) {
        send(fresh, policy_atom::value, set_.policy);
        send(set_.policy, shard_atom::value, std::uint32_t(idx), fresh);
      }
      send(set_.ingress, shard_atom::value, std::uint32_t(idx), fresh);
      return;
    }
  }
  // The rows the dead expert or queue held are sent again (after the new queue, same sender).
  for (const auto& shard : set_.shards)
    send(shard, replay_atom::value, std::uint32_t(idx));
}

bool supervisor::replace_device(std::size_t device, const std::string& why) {
  if (!ctx_->placement) {
    escalate(why + "; its experts cannot be re-placed: each expert device holds only its own experts' weights");
    return false;
  }
  lost_[device] = true;
  std::vector<std::size_t> load(set_.queues.size(), 0);
  std::string lost;
  for (std::size_t d = 0; d < lost_.size(); ++d)
    if (lost_[d])
      lost += (lost.empty() ? "" : ", ") + std::to_string(d);
  for (std::size_t e = 0; e < set_.experts.size(); ++e)
    ++load[ctx_->device_of(e)];
  if (std::find(lost_.begin(), lost_.end(), false) == lost_.end()) {
    escalate(why + "; no expert device survives (lost: " + lost + ")");
    return false;
  }
  spdlog::warn("supervisor: {} past {} restarts within {} ms: expert device {} is lost, its experts re-placed", why,
               params_.max_restarts, params_.period.count(), device);
  std::vector<bool> targets(set_.queues.size(), false);
  for (std::uint32_t e : ctx_->hosted_by(device)) {
    std::size_t to = set_.queues.size();
    for (std::size_t d = 0; d < set_.queues.size(); ++d)  // the least loaded survivor, lowest first
      if (!lost_[d] && (to == set_.queues.size() || load[d] < load[to]))
        to = d;
    ++load[to];
    --load[device];
    targets[to] = true;
    // A fresh actor, dead or not: the old one's death (pending, maybe) is no longer heard.
    caf::actor old = set_.experts[e];
    children_.erase(old.address());
    demonitor(old);
    caf::anon_send_exit(old, caf::exit_reason::user_shutdown);
    caf::actor fresh = spawn<expert>(ctx_, e);
    set_.experts[e] = fresh;
    watch_fresh(fresh, kind::expert, e);
    expert_restarts_[e].clear();  // a new device: a new count
    send(set_.queues[to], adopt_expert_atom::value, e, fresh);
    ctx_->placement->move(e, to);
    send(set_.queues[device], hand_off_atom::value, e);
    ++report_.restarts;
  }
  for (std::size_t d = 0; d < targets.size(); ++d)
    if (targets[d])
      for (const auto& shard : set_.shards)
        send(shard, replay_atom::value, std::uint32_t(d));
  return true;
}

std::string supervisor::move(std::uint32_t expert, std::uint32_t device) {
  if (stopping_)
    return "move_expert: supervision gave up (" + escalation_ + ")";
  if (!ctx_->placement)
    return "move_expert: each expert device holds only its own experts' weights (per_device_weights or a device "
           "backend): moving one would need loading its weights there, which is not built";
  if (expert >= set_.experts.size())
    return "move_expert: expert " + std::to_string(expert) + " is out of range (the model has " +
           std::to_string(set_.experts.size()) + " routed experts)";
  if (device >= set_.queues.size())
    return "move_expert: expert device " + std::to_string(device) + " is out of range (the engine has " +
           std::to_string(set_.queues.size()) + ")";
  if (lost_[device])
    return "move_expert: expert device " + std::to_string(device) + " is lost (its experts were re-placed)";
  std::size_t from = ctx_->device_of(expert);
  if (from == device)
    return {};
  // Adopt before the placement changes: a shard that reads the new placement sends to a
  // queue whose mailbox already holds the adoption.
  send(set_.queues[device], adopt_expert_atom::value, expert, set_.experts[expert]);
  ctx_->placement->move(expert, device);
  send(set_.queues[from], hand_off_atom::value, expert);
  return {};
}

void supervisor::escalate(const std::string& why) {
  stopping_ = true;
  report_.escalated = true;
  escalation_ = "supervision gave up after " + std::to_string(params_.max_restarts) + " restarts within " +
                std::to_string(params_.period.count()) + " ms: " + why;
  spdlog::error("supervisor: {}", escalation_);
  // Stop every child, and end the requests only once none can emit a token any more.
  downs_pending_ = children_.size();
  for (const auto& [addr, who] : children_) {
    const std::vector<caf::actor>& list = who.what == kind::shard ? set_.shards
                                        : who.what == kind::queue ? set_.queues
                                                                  : set_.experts;
    exit_with(list[who.idx], caf::make_error(caf::sec::runtime_error, escalation_));
  }
  if (downs_pending_ == 0)
    send(set_.ingress, node_lost_atom::value, escalation_);
}

}  // namespace moert::actors
