#pragma once

// Entry and exit of the data path: pins each request to the attention shard with the most
// free KV capacity (in tokens: prompt + max_new_tokens, reserved for the request's life),
// queues it when no shard has room yet, and refuses it outright when it could never fit.
// A request's last event passes through here (request_ended): the ingress releases the
// reservation and the id first, then tells the client, so an id is reusable at once.

#include "actors/protocol.hpp"
#include "actors/runtime.hpp"

#include <caf/all.hpp>

#include <deque>
#include <map>

namespace moert::actors {

class ingress : public caf::event_based_actor {
public:
  // `stats` (may be null) hears how many requests run and wait.
  // `max_queued_tokens` (0: unlimited) bounds the prompt tokens of the requests waiting for a
  // shard: one that would pass it is refused at once with request_error::overloaded.
  ingress(caf::actor_config& cfg, std::size_t kv_capacity_tokens, runtime_stats* stats = nullptr,
          std::size_t max_queued_tokens = 0);

  caf::behavior make_behavior() override;
  void on_exit() override;

private:
  void place_waiting();
  void reject(const admit_request& request, finish_reason finish, request_error code, const std::string& why);
  void publish_load();

  std::size_t capacity_;
  std::size_t max_queued_tokens_;
  std::size_t queued_tokens_ = 0;  // prompt tokens in waiting_
  runtime_stats* stats_;
  std::vector<caf::actor> shards_;
  std::vector<std::size_t> free_;
  std::deque<admit_request> waiting_;
  struct pinned_request {
    std::size_t shard;
    std::shared_ptr<token_sink> sink;  // the client's: a remote shard sends its events here
    std::chrono::steady_clock::time_point admitted;
    admit_request request;  // as admitted, to replay it on a replacement shard
    std::shared_ptr<delivery_log> delivered;  // what the client got (the shard records it)
    bool cancelled = false;
    bool expired = false;  // its deadline passed: its cancelled end becomes deadline_exceeded
  };
  void on_deadline(std::uint64_t id);
  // A shard died and `shard` replaces it: its requests start again there from their tokens.
  void replay_on(std::size_t idx, caf::actor shard);
  std::map<std::uint64_t, pinned_request> pinned_;
  bool draining_ = false;
  std::string lost_;  // why a cluster node is gone, once one is
};

}  // namespace moert::actors
