#pragma once

// What a client receives per generated token. Free of CAF so the public engine API can use it.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace moert::actors {

struct token_event {
  std::uint64_t request_id = 0;
  std::int32_t token = -1;
  std::size_t index = 0;      // 0 for the first generated token
  bool last = false;          // no more events follow for this request
  std::vector<float> logits;  // the logits the token was drawn from, when requested
  // First event only, when requested: logits at every prompt position (prompt × vocab).
  std::vector<float> prompt_logits;
  std::string error;          // non-empty: the request failed or was cancelled (no token)
};

// Called on an attention shard's actor thread, one call at a time per request: keep it short.
using token_sink = std::function<void(token_event)>;

}  // namespace moert::actors
