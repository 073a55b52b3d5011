#pragma once

// What a client's sink receives per generated token, and how a request ended. Free of CAF;
// the engine turns it into the public moert::TokenEvent (the enums below map one to one).

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace moert::actors {

enum class finish_reason { none, length, stop, cancelled, error };
enum class request_error { none, invalid_request, context_too_long, overloaded, shutdown, internal, deadline_exceeded };

struct token_event {
  std::uint64_t request_id = 0;
  std::int32_t token = -1;    // -1: a last event without a token (error or cancel)
  std::size_t index = 0;      // 0 for the first generated token
  bool last = false;          // no more events follow for this request
  finish_reason finish = finish_reason::none;  // on the last event
  request_error error_code = request_error::none;
  std::string error;          // non-empty exactly when error_code != none
  float logprob = 0;          // log-softmax of `token`, when requested
  std::vector<std::pair<std::int32_t, float>> top_logprobs;  // (token, logprob), best first
  std::vector<float> logits;  // the logits the token was drawn from, when requested
  // First event only, when requested: logits at every prompt position (prompt × vocab).
  std::vector<float> prompt_logits;
  // When the ingress pinned the request to a shard (epoch: never admitted); last event only.
  std::chrono::steady_clock::time_point admitted{};
};

// A request's events, in order, one call at a time: every event but the last comes from its
// attention shard's thread, the last one from the ingress's, after the ingress released the
// request (so its id is free again when the sink hears the end). Keep it short.
using token_sink = std::function<void(token_event)>;

inline token_event end_event(std::uint64_t id, std::size_t index, finish_reason finish, request_error code,
                             std::string error) {
  token_event event;
  event.request_id = id;
  event.index = index;
  event.last = true;
  event.finish = finish;
  event.error_code = code;
  event.error = std::move(error);
  return event;
}

}  // namespace moert::actors
