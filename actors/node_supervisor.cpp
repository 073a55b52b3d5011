#include "actors/node_supervisor.hpp"

#include <spdlog/spdlog.h>

#include <limits>

namespace moert::actors {

namespace {

double ms_since(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - since).count();
}

}  // namespace

node_supervisor::node_supervisor(caf::actor_config& cfg, cluster_placement placement,
                                 std::shared_ptr<cluster_health> health)
    : caf::event_based_actor(cfg), p_(std::move(placement)), health_(std::move(health)) {
  lost_.assign(p_.nodes.size(), false);
  std::lock_guard<std::mutex> guard{health_->mutex};
  health_->lost.assign(p_.nodes.size(), false);
}

// Handles are strong references: drop them so nothing here keeps a node's actors alive.
void node_supervisor::on_exit() {
  p_ = {};
  watched_.clear();
}

void node_supervisor::watch(const caf::actor& actor, std::size_t node, kind what, std::uint32_t idx) {
  watched_[actor.address()] = {node, what, idx};
  monitor(actor);
}

caf::behavior node_supervisor::make_behavior() {
  for (std::size_t i = 0; i < p_.nodes.size(); ++i)
    watch(p_.nodes[i].host, i, kind::node, 0);
  for (std::size_t d = 0; d < p_.queues.size(); ++d)
    watch(p_.queues[d], p_.queue_node[d], kind::queue, std::uint32_t(d));
  for (std::size_t a = 0; a < p_.shards.size(); ++a)
    watch(p_.shards[a], p_.shard_node[a], kind::shard, std::uint32_t(a));
  set_down_handler([this](const caf::down_msg& down) { on_down(down); });
  return {
    // Whether recovery gave up (a probe for tests): answers failed_.
    [this](caf::get_atom) { return failed_; },
  };
}

void node_supervisor::on_down(const caf::down_msg& down) {
  auto it = watched_.find(down.source);
  if (it == watched_.end())
    return;
  watched who = it->second;
  watched_.erase(it);
  // A node releasing its part on purpose (the engine shutting down) is no loss.
  if (down.reason == caf::exit_reason::user_shutdown || down.reason == caf::exit_reason::normal)
    return;
  if (who.node >= lost_.size() || lost_[who.node] || failed_)
    return;
  const std::string& name = p_.nodes[who.node].name;
  std::string why = system().render(down.reason);
  // The node process itself (dead, or silent past the liveness timeout: CAF then drops the
  // connection and every proxy of that node goes with remote_link_unreachable).
  if (who.what == kind::node || down.reason == caf::exit_reason::remote_link_unreachable)
    return lose(who.node, "node " + name + " was lost (" + why + ")");
  // One part died while its node lives: re-place that part only (the node may take it again).
  auto now = std::chrono::steady_clock::now();
  while (!restarts_.empty() && now - restarts_.front() > p_.restart_period)
    restarts_.pop_front();
  std::string what = (who.what == kind::queue ? "expert device " : "attention shard ") + std::to_string(who.idx) +
                     " on node " + name + " died (" + why + ")";
  if (restarts_.size() >= p_.max_restarts)
    return give_up("recovery gave up after " + std::to_string(p_.max_restarts) + " re-placements within " +
                   std::to_string(p_.restart_period.count()) + " ms: " + what);
  restarts_.push_back(now);
  spdlog::warn("cluster: {}", what);
  if (who.what == kind::queue)
    place_expert(who.idx, what, now, 0);
  else if (experts_pending_ > 0)
    shards_waiting_.push_back({who.idx, {what, now}});
  else
    place_shard(who.idx, what, now, 0);
}

void node_supervisor::lose(std::size_t node, const std::string& reason) {
  auto since = std::chrono::steady_clock::now();
  lost_[node] = true;
  {
    std::lock_guard<std::mutex> guard{health_->mutex};
    health_->lost[node] = true;
  }
  spdlog::warn("cluster: {}", reason);
  // The survivors cancel their UCX transfers with the lost node now, not at their deadline.
  caf::node_id gone = p_.nodes[node].host.node();
  for (std::size_t i = 0; i < p_.nodes.size(); ++i)
    if (!lost_[i])
      anon_send(p_.nodes[i].host, node_lost_atom::value, gone, reason);
  if (failed_)
    return;
  for (std::size_t d = 0; d < p_.queue_node.size(); ++d)
    if (p_.queue_node[d] == node)
      place_expert(std::uint32_t(d), reason, since, 0);
  for (std::size_t a = 0; a < p_.shard_node.size(); ++a)
    if (p_.shard_node[a] == node) {
      // A new shard gets every μ-queue: it waits for the expert devices being re-placed.
      if (experts_pending_ > 0)
        shards_waiting_.push_back({std::uint32_t(a), {reason, since}});
      else
        place_shard(std::uint32_t(a), reason, since, 0);
    }
}

std::size_t node_supervisor::pick(bool attention) const {
  std::size_t best = p_.nodes.size(), best_load = std::numeric_limits<std::size_t>::max();
  for (std::size_t i = 0; i < p_.nodes.size(); ++i) {
    if (lost_[i] || !(attention ? p_.nodes[i].attention : p_.nodes[i].experts))
      continue;
    std::size_t load = 0;
    for (std::size_t n : attention ? p_.shard_node : p_.queue_node)
      load += n == i;
    if (load < best_load) {
      best = i;
      best_load = load;
    }
  }
  return best;
}

void node_supervisor::place_expert(std::uint32_t device, std::string lost, std::chrono::steady_clock::time_point since,
                                   std::size_t tries) {
  if (failed_)
    return;
  std::size_t target = pick(false);
  if (target == p_.nodes.size() || tries > p_.nodes.size())
    return give_up(lost + "; no surviving expert node could take over expert device " + std::to_string(device));
  model_source part = p_.model;
  part.attention_side = false;
  part.first_expert_device = device;
  part.num_expert_devices = 1;
  host_experts ask{part, device, 1, std::uint32_t(p_.queues.size()), p_.threads_per_device, p_.scheduler, p_.ingress};
  ++experts_pending_;
  request(p_.nodes[target].host, p_.adopt_timeout, adopt_atom::value, std::move(ask))
      .then(
          [this, device, target, lost, since](std::vector<caf::actor>& queues) {
            --experts_pending_;
            if (failed_ || queues.size() != 1)
              return give_up(lost + "; node " + p_.nodes[target].name + " answered the adoption of expert device " +
                             std::to_string(device) + " with " + std::to_string(queues.size()) + " queues");
            caf::actor queue = queues.front();
            p_.queues[device] = queue;
            p_.queue_node[device] = target;
            watch(queue, target, kind::queue, device);
            if (lost_[target])  // lost while adopting: its down message came first
              return place_expert(device, lost, since, 1);
            // The new queue first, then the replay: the same sender, so in that order.
            for (const auto& shard : p_.shards)
              send(shard, queue_atom::value, device, queue);
            if (p_.policy)
              send(p_.policy, queue_atom::value, device, queue);
            for (const auto& shard : p_.shards)
              send(shard, replay_atom::value, device);
            double ms = ms_since(since);
            std::string what = "expert device " + std::to_string(device) + " -> " + p_.nodes[target].name;
            spdlog::warn("cluster: {} re-placed {} ms after the loss was noticed", what, ms);
            {
              std::lock_guard<std::mutex> guard{health_->mutex};
              health_->recoveries.push_back({lost, what, since, ms});
            }
            if (experts_pending_ == 0) {
              auto waiting = std::move(shards_waiting_);
              shards_waiting_.clear();
              for (auto& [shard, why] : waiting)
                place_shard(shard, why.first, why.second, 0);
            }
          },
          [this, device, target, lost, since, tries](caf::error& err) {
            --experts_pending_;
            spdlog::warn("cluster: node {} could not adopt expert device {}: {}", p_.nodes[target].name, device,
                         system().render(err));
            if (!lost_[target])
              return give_up(lost + "; node " + p_.nodes[target].name + " could not take over expert device " +
                             std::to_string(device) + ": " + system().render(err));
            place_expert(device, lost, since, tries + 1);
          });
}

void node_supervisor::place_shard(std::uint32_t shard, std::string lost, std::chrono::steady_clock::time_point since,
                                  std::size_t tries) {
  if (failed_)
    return;
  std::size_t target = pick(true);
  if (target == p_.nodes.size() || tries > p_.nodes.size())
    return give_up(lost + "; no surviving attention node could take over attention shard " + std::to_string(shard));
  model_source part = p_.model;
  part.attention_side = true;
  part.first_expert_device = 0;
  part.num_expert_devices = 0;  // no routed expert
  host_shards ask{part,      shard, 1, std::uint32_t(p_.queues.size()), p_.threads_per_device, p_.plan, p_.queues,
                  p_.ingress};
  request(p_.nodes[target].host, p_.adopt_timeout, adopt_atom::value, std::move(ask))
      .then(
          [this, shard, target, lost, since](std::vector<caf::actor>& shards) {
            if (failed_ || shards.size() != 1)
              return give_up(lost + "; node " + p_.nodes[target].name + " answered the adoption of attention shard " +
                             std::to_string(shard) + " with " + std::to_string(shards.size()) + " shards");
            caf::actor fresh = shards.front();
            p_.shards[shard] = fresh;
            p_.shard_node[shard] = target;
            watch(fresh, target, kind::shard, shard);
            if (lost_[target])
              return place_shard(shard, lost, since, 1);
            if (p_.policy) {
              send(fresh, policy_atom::value, p_.policy);
              send(p_.policy, shard_atom::value, shard, fresh);
            }
            send(p_.ingress, shard_atom::value, shard, fresh);  // it replays the shard's requests
            double ms = ms_since(since);
            std::string what = "attention shard " + std::to_string(shard) + " -> " + p_.nodes[target].name;
            spdlog::warn("cluster: {} re-placed {} ms after the loss was noticed", what, ms);
            std::lock_guard<std::mutex> guard{health_->mutex};
            health_->recoveries.push_back({lost, what, since, ms});
          },
          [this, shard, target, lost, since, tries](caf::error& err) {
            if (!lost_[target])
              return give_up(lost + "; node " + p_.nodes[target].name + " could not take over attention shard " +
                             std::to_string(shard) + ": " + system().render(err));
            place_shard(shard, lost, since, tries + 1);
          });
}

void node_supervisor::give_up(const std::string& reason) {
  if (failed_)
    return;
  failed_ = true;
  {
    std::lock_guard<std::mutex> guard{health_->mutex};
    health_->failed = true;
  }
  spdlog::error("cluster: {}", reason);
  send(p_.ingress, node_lost_atom::value, reason);
}

}  // namespace moert::actors
