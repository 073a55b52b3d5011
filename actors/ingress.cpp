#include "actors/ingress.hpp"

#include "actors/mailbox_size.hpp"

#include <algorithm>

namespace moert::actors {

namespace {
using deadline_atom = caf::atom_constant<caf::atom("deadline")>;  // ingress → itself
}  // namespace

ingress::ingress(caf::actor_config& cfg, std::size_t kv_capacity_tokens, runtime_stats* stats,
                 std::size_t max_queued_tokens)
    : caf::event_based_actor(cfg), capacity_(kv_capacity_tokens), max_queued_tokens_(max_queued_tokens), stats_(stats) {}

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
      if (stats_)
        stats_->note_mailbox(runtime_stats::mailbox_kind::ingress, mailbox_size(*this));
      if (draining_)
        return reject(request, finish_reason::error, request_error::shutdown, "the engine is shutting down");
      if (!lost_.empty())
        return reject(request, finish_reason::error, request_error::internal, lost_);
      if (request.kv_tokens() > capacity_)
        return reject(request, finish_reason::error, request_error::context_too_long,
                      "request needs " + std::to_string(request.kv_tokens()) +
                          " KV tokens, a shard holds at most " + std::to_string(capacity_));
      if (max_queued_tokens_ > 0 && request.prompt.size() > max_queued_tokens_ - std::min(max_queued_tokens_, queued_tokens_))
        return reject(request, finish_reason::error, request_error::overloaded,
                      "overloaded: " + std::to_string(queued_tokens_) + " prompt tokens queued + " +
                          std::to_string(request.prompt.size()) + " exceed max_queued_tokens " +
                          std::to_string(max_queued_tokens_));
      if (request.deadline != std::chrono::steady_clock::time_point{}) {
        auto left = std::max(request.deadline - std::chrono::steady_clock::now(), std::chrono::steady_clock::duration{0});
        delayed_send(this, left, deadline_atom::value, request.request_id);
      }
      queued_tokens_ += request.prompt.size();
      waiting_.push_back(std::move(request));
      place_waiting();
    },
    [this](deadline_atom, std::uint64_t id) { on_deadline(id); },
    [this](request_ended& ended) {
      std::shared_ptr<token_sink> sink = std::move(ended.sink);
      if (auto it = pinned_.find(ended.request_id); it != pinned_.end()) {
        free_[it->second.shard] += ended.kv_tokens;
        if (!sink) {  // from a shard in another process
          sink = std::move(it->second.sink);
          if (stats_ && ended.last.token >= 0)
            stats_->count_tokens(1);
        }
        if (ended.last.admitted == std::chrono::steady_clock::time_point{})
          ended.last.admitted = it->second.admitted;
        if (it->second.expired && ended.last.finish == finish_reason::cancelled) {
          ended.last.finish = finish_reason::error;
          ended.last.error_code = request_error::deadline_exceeded;
          ended.last.error = "deadline exceeded while generating (after " + std::to_string(ended.last.index) +
                             " tokens)";
        }
        pinned_.erase(it);
      }
      publish_load();
      // The id is free here before the client can hear that its request ended.
      if (sink)
        (*sink)(std::move(ended.last));
      place_waiting();
    },
    // A token from a shard in another process.
    [this](token_event& event) {
      if (stats_)  // counted here: the shard's counters live in its own process
        stats_->count_tokens(1);
      auto it = pinned_.find(event.request_id);
      if (it == pinned_.end())
        return;
      // The shard's delivery log stays in its own process: a replay on another node (its node
      // lost) starts from what is recorded here.
      if (event.token >= 0 && it->second.delivered) {
        std::lock_guard<std::mutex> guard{it->second.delivered->mutex};
        it->second.delivered->tokens.push_back(event.token);
      }
      if (it->second.sink)
        (*it->second.sink)(std::move(event));
    },
    [this](cancel_atom, std::uint64_t id) {
      auto queued = std::find_if(waiting_.begin(), waiting_.end(),
                                 [id](const admit_request& r) { return r.request_id == id; });
      if (queued != waiting_.end()) {
        admit_request request = std::move(*queued);
        waiting_.erase(queued);
        queued_tokens_ -= request.prompt.size();
        publish_load();
        reject(request, finish_reason::cancelled, request_error::none, {});
      } else if (auto it = pinned_.find(id); it != pinned_.end()) {
        it->second.cancelled = true;  // a replay ends it instead of running it again
        send(shards_[it->second.shard], cancel_atom::value, id);
      }
    },
    [this](drain_atom) { draining_ = true; },
    [this](shard_atom, std::uint32_t idx, caf::actor& shard) { replay_on(idx, std::move(shard)); },
    // A cluster node is gone: every request may have tokens there, so all of them end with
    // the reason, and new ones are refused with it.
    [this](node_lost_atom, std::string& reason) {
      lost_ = reason;
      for (auto& [id, pinned] : pinned_)
        if (pinned.sink)
          (*pinned.sink)(end_event(id, 0, finish_reason::error, request_error::internal, reason));
      pinned_.clear();
      while (!waiting_.empty()) {
        reject(waiting_.front(), finish_reason::error, request_error::internal, reason);
        waiting_.pop_front();
      }
      queued_tokens_ = 0;
      std::fill(free_.begin(), free_.end(), std::size_t{0});
      publish_load();
    },
  };
}

// First come, first placed: a request waits behind earlier ones even if it would fit.
void ingress::place_waiting() {
  while (!waiting_.empty() && !shards_.empty()) {
    std::size_t best = std::size_t(std::max_element(free_.begin(), free_.end()) - free_.begin());
    admit_request& request = waiting_.front();
    if (free_[best] < request.kv_tokens())
      break;
    free_[best] -= request.kv_tokens();
    request.admitted = std::chrono::steady_clock::now();
    // The shard records what the client got here: a replay after its death starts from it.
    auto delivered = std::make_shared<delivery_log>();
    request.delivered = delivered;
    pinned_[request.request_id] = pinned_request{best, request.sink, request.admitted, request, delivered};
    queued_tokens_ -= request.prompt.size();
    send(shards_[best], std::move(request));
    waiting_.pop_front();
  }
  publish_load();
}

// Waiting: refused now. Running: cancelled at its shard, and its end reported as the deadline.
void ingress::on_deadline(std::uint64_t id) {
  auto now = std::chrono::steady_clock::now();
  auto due = [now](const admit_request& r) {  // not a later request reusing the id
    return r.deadline != std::chrono::steady_clock::time_point{} && r.deadline <= now;
  };
  auto queued = std::find_if(waiting_.begin(), waiting_.end(), [id](const admit_request& r) { return r.request_id == id; });
  if (queued != waiting_.end()) {
    if (!due(*queued))
      return;
    admit_request request = std::move(*queued);
    waiting_.erase(queued);
    queued_tokens_ -= request.prompt.size();
    publish_load();
    reject(request, finish_reason::error, request_error::deadline_exceeded, "deadline exceeded while queued");
    place_waiting();
  } else if (auto it = pinned_.find(id); it != pinned_.end() && !it->second.expired && due(it->second.request)) {
    it->second.expired = true;
    it->second.cancelled = true;
    send(shards_[it->second.shard], cancel_atom::value, id);
  }
}

void ingress::replay_on(std::size_t idx, caf::actor shard) {
  if (idx >= shards_.size())
    return;
  shards_[idx] = std::move(shard);
  std::vector<std::uint64_t> ended;
  for (auto& [id, pinned] : pinned_) {
    if (pinned.shard != idx)
      continue;
    if (pinned.cancelled) {  // its cancel died with the old shard
      std::size_t index = 0;
      {
        std::lock_guard<std::mutex> guard{pinned.delivered->mutex};
        index = pinned.delivered->tokens.size();
      }
      free_[idx] += pinned.request.kv_tokens();
      token_event last = pinned.expired ? end_event(id, index, finish_reason::error, request_error::deadline_exceeded,
                                                    "deadline exceeded while generating")
                                        : end_event(id, index, finish_reason::cancelled, request_error::none, {});
      last.admitted = pinned.admitted;
      if (pinned.sink)
        (*pinned.sink)(std::move(last));
      ended.push_back(id);
      continue;
    }
    admit_request again = pinned.request;
    {
      std::lock_guard<std::mutex> guard{pinned.delivered->mutex};
      again.replayed = pinned.delivered->tokens;
    }
    send(shards_[idx], std::move(again));
  }
  for (std::uint64_t id : ended)
    pinned_.erase(id);
  publish_load();
  place_waiting();
}

void ingress::publish_load() {
  if (stats_)
    stats_->set_load(pinned_.size(), waiting_.size());
}

void ingress::reject(const admit_request& request, finish_reason finish, request_error code, const std::string& why) {
  if (request.sink)
    (*request.sink)(end_event(request.request_id, 0, finish, code, why));
}

}  // namespace moert::actors
