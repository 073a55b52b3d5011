#include "actors/ingress.hpp"

#include <algorithm>

namespace moert::actors {

ingress::ingress(caf::actor_config& cfg, std::size_t kv_capacity_tokens)
    : caf::event_based_actor(cfg), capacity_(kv_capacity_tokens) {}

void ingress::on_exit() {  // break handle cycles (see attention_shard::on_exit)
  shards_.clear();
  waiting_.clear();
}

caf::behavior ingress::make_behavior() {
  return {
    // The engine hands over the shards once they exist (they need this actor's handle).
    [this](std::vector<caf::actor>& shards) {
      shards_ = std::move(shards);
      free_.assign(shards_.size(), capacity_);
      place_waiting();
    },
    [this](admit_request& request) {
      if (draining_)
        return reject(request, "the engine is shutting down");
      if (request.kv_tokens() > capacity_)
        return reject(request, "request needs " + std::to_string(request.kv_tokens()) +
                                   " KV tokens, a shard holds at most " + std::to_string(capacity_));
      waiting_.push_back(std::move(request));
      place_waiting();
    },
    [this](done_atom, std::uint64_t id, std::uint64_t kv_tokens) {
      auto it = pinned_.find(id);
      if (it == pinned_.end())
        return;
      free_[it->second] += kv_tokens;
      pinned_.erase(it);
      place_waiting();
    },
    [this](cancel_atom, std::uint64_t id) {
      auto queued = std::find_if(waiting_.begin(), waiting_.end(),
                                 [id](const admit_request& r) { return r.request_id == id; });
      if (queued != waiting_.end()) {
        reject(*queued, "cancelled");
        waiting_.erase(queued);
      } else if (auto it = pinned_.find(id); it != pinned_.end()) {
        send(shards_[it->second], cancel_atom::value, id);
      }
    },
    [this](drain_atom) { draining_ = true; },
  };
}

// First come, first placed: a request waits behind earlier ones even if it would fit.
void ingress::place_waiting() {
  while (!waiting_.empty() && !shards_.empty()) {
    std::size_t best = std::size_t(std::max_element(free_.begin(), free_.end()) - free_.begin());
    admit_request& request = waiting_.front();
    if (free_[best] < request.kv_tokens())
      return;
    free_[best] -= request.kv_tokens();
    pinned_[request.request_id] = best;
    send(shards_[best], std::move(request));
    waiting_.pop_front();
  }
}

void ingress::reject(const admit_request& request, const std::string& why) {
  if (request.sink)
    (*request.sink)(token_event{request.request_id, -1, 0, true, {}, {}, why});
}

}  // namespace moert::actors
