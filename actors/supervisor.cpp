#include "actors/supervisor.hpp"

#include "actors/attention_shard.hpp"
#include "actors/expert.hpp"
#include "actors/mu_queue.hpp"

#include <spdlog/spdlog.h>

namespace moert::actors {

supervisor::supervisor(caf::actor_config& cfg, const runtime_context* ctx, supervised_set children,
                       supervision_params params)
    : caf::event_based_actor(cfg), ctx_(ctx), set_(std::move(children)), params_(params) {}

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
      const std::vector<caf::actor>* list = what == "attention" ? &set_.shards
                                          : what == "queue"     ? &set_.queues
                                          : what == "expert"    ? &set_.experts
                                                                : nullptr;
      if (stopping_ || !list || idx >= list->size())
        return false;
      caf::anon_send_exit((*list)[idx], caf::exit_reason::kill);
      return true;
    },
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
  while (!restarts_.empty() && now - restarts_.front() > params_.period)
    restarts_.pop_front();
  if (restarts_.size() >= params_.max_restarts)
    return escalate(why);
  restarts_.push_back(now);
  restart(who, why);
  ++report_.restarts;
  report_.last_recovery_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - now).count();
}

void supervisor::restart(child who, const std::string& why) {
  spdlog::warn("supervisor: {}; re-created, its work replayed", why);
  std::size_t idx = who.idx;
  switch (who.what) {
    case kind::expert: {
      // The queue first: from here on it hands nothing to the dead expert, and the
      // replacement's first pull lands behind this message.
      send(set_.queues[idx], expert_lost_atom::value);
      caf::actor fresh = spawn<expert>(ctx_, idx, set_.expert_devices[idx], set_.queues[idx]);
      set_.experts[idx] = fresh;
      watch(fresh, kind::expert, idx);
      break;
    }
    case kind::queue: {
      caf::actor fresh = spawn<mu_queue>(ctx_, idx, set_.scheduler, set_.expert_devices[idx]->name());
      set_.queues[idx] = fresh;
      watch(fresh, kind::queue, idx);
      send(set_.experts[idx], queue_atom::value, fresh);
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
      watch(fresh, kind::shard, idx);
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
