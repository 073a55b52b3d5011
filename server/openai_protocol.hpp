#pragma once

// The OpenAI wire format, apart from any socket: request bodies of /v1/completions and
// /v1/chat/completions parsed and validated into a generation_request (an error names the
// parameter), and the response objects, stream chunks and errors in OpenAI's shapes.
//
// Thread safety: pure functions.

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace moert::server {

// -- errors -------------------------------------------------------------------

// {"error": {"message", "type", "param", "code"}} with its HTTP status.
struct api_error {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // empty: null
  std::string code;   // empty: null
};

nlohmann::json to_json(const api_error& err);

// 400 invalid_request_error naming `param`.
api_error bad_param(std::string param, std::string message, std::string code = {});

// -- requests -----------------------------------------------------------------

enum class endpoint { completions, chat };

// The limits the parser checks against; the server fills them from its model.
struct request_limits {
  std::size_t max_stop_strings = 4;           // as OpenAI
  std::size_t max_top_logprobs = 20;          // as OpenAI (completions' logprobs: 0..20 too)
};

struct generation_request {
  endpoint kind = endpoint::completions;
  std::string model;  // empty when the client sent none
  // completions: `prompt` as text, or as token ids (OpenAI allows a list of ints).
  std::optional<std::string> prompt_text;
  std::vector<std::int32_t> prompt_ids;
  // chat: the messages, each {"role", "content"} with content flattened to a string.
  nlohmann::json messages = nlohmann::json::array();
  bool add_generation_prompt = true;

  std::optional<std::size_t> max_tokens;  // absent: the server's default
  float temperature = 1.0f;               // OpenAI's default
  float top_p = 1.0f;
  std::int32_t top_k = 0;                 // extension (as vLLM): 0 or -1 = off
  std::optional<std::int64_t> seed;
  std::vector<std::string> stop;
  bool ignore_eos = false;  // extension (as vLLM)

  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage

  bool logprobs = false;
  std::size_t top_logprobs = 0;
};

// Parses and validates a request body. Unknown fields are ignored (clients send many);
// known ones this server cannot honour (n > 1, echo, best_of > 1, penalties, logit_bias,
// tools, …) are refused with 400 naming them rather than silently dropped.
std::optional<api_error> parse_request(endpoint kind, std::string_view body, generation_request& out,
                                       const request_limits& limits = {});

// -- responses ----------------------------------------------------------------

struct response_meta {
  endpoint kind = endpoint::completions;
  std::string id;  // "cmpl-…" or "chatcmpl-…"
  std::int64_t created = 0;  // unix seconds
  std::string model;
};

struct usage_counts {
  std::size_t prompt_tokens = 0;
  std::size_t completion_tokens = 0;
};

// One generated token with its log-probability and the best alternatives.
struct token_logprob {
  std::string token;  // its text
  float logprob = 0;
  std::vector<std::pair<std::string, float>> top;  // highest first
};

// OpenAI's `logprobs` object for the endpoint: completions {tokens, token_logprobs,
// top_logprobs, text_offset} (text_offset counts bytes from `offset`), chat {content: [...]}.
nlohmann::json logprobs_json(endpoint kind, const std::vector<token_logprob>& tokens, std::size_t offset = 0);

// A non-streamed response. `finish_reason` is "stop" or "length"; logprobs null when absent.
nlohmann::json completion_response(const response_meta& meta, const std::string& text, const char* finish_reason,
                                   const usage_counts& usage, const nlohmann::json& logprobs);

// One streamed chunk. Chat: `role` is set on the first chunk only; `finish_reason` null until
// the last. With include_usage every chunk carries "usage": null (as OpenAI does).
nlohmann::json stream_chunk(const response_meta& meta, const std::string& text, bool first, const char* finish_reason,
                            const nlohmann::json& logprobs, bool include_usage);

// The last chunk under include_usage: empty choices, the usage.
nlohmann::json usage_chunk(const response_meta& meta, const usage_counts& usage);

nlohmann::json usage_json(const usage_counts& usage);

// GET /v1/models.
nlohmann::json models_response(const std::string& model, std::int64_t created, std::size_t max_model_len);

// "data: <json>\n\n", and the terminator "data: [DONE]\n\n".
std::string sse_event(const nlohmann::json& payload);
inline constexpr std::string_view sse_done = "data: [DONE]\n\n";

}  // namespace moert::server
