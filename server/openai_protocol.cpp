#include "server/openai_protocol.hpp"

#include <cmath>
#include <limits>

namespace moert::server {

using nlohmann::json;

// -- errors -------------------------------------------------------------------

json to_json(const api_error& err) {
  json body = {{"message", err.message},
               {"type", err.type},
               {"param", err.param.empty() ? json(nullptr) : json(err.param)},
               {"code", err.code.empty() ? json(nullptr) : json(err.code)}};
  return {{"error", std::move(body)}};
}

api_error bad_param(std::string param, std::string message, std::string code) {
  return {400, std::move(message), "invalid_request_error", std::move(param), std::move(code)};
}

// -- requests -----------------------------------------------------------------

namespace {

std::string type_name(const json& v) {
  return v.type_name();
}

bool absent(const json& body, const char* key) {
  auto it = body.find(key);
  return it == body.end() || it->is_null();
}

std::optional<api_error> read_bool(const json& body, const char* key, bool& out) {
  if (absent(body, key))
    return std::nullopt;
  const json& v = body.at(key);
  if (!v.is_boolean())
    return bad_param(key, std::string{"'"} + key + "' must be a boolean, not " + type_name(v));
  out = v.get<bool>();
  return std::nullopt;
}

std::optional<api_error> read_number(const json& body, const char* key, double lo, double hi, bool lo_open,
                                     float& out) {
  if (absent(body, key))
    return std::nullopt;
  const json& v = body.at(key);
  if (!v.is_number())
    return bad_param(key, std::string{"'"} + key + "' must be a number, not " + type_name(v));
  double x = v.get<double>();
  if (!std::isfinite(x) || x > hi || x < lo || (lo_open && x == lo))
    return bad_param(key, std::string{"'"} + key + "' is " + v.dump() + "; it must be in " + (lo_open ? "(" : "[") +
                              json(lo).dump() + ", " + json(hi).dump() + "]");
  out = float(x);
  return std::nullopt;
}

std::optional<api_error> read_int(const json& body, const char* key, std::int64_t lo, std::int64_t hi,
                                  std::optional<std::int64_t>& out) {
  if (absent(body, key))
    return std::nullopt;
  const json& v = body.at(key);
  if (!v.is_number_integer())
    return bad_param(key, std::string{"'"} + key + "' must be an integer, not " +
                              (v.is_number() ? "the number " + v.dump() : type_name(v)));
  if (v.is_number_unsigned() && v.get<std::uint64_t>() > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
    return bad_param(key, std::string{"'"} + key + "' is " + v.dump() + "; it must be at most " + std::to_string(hi));
  std::int64_t x = v.get<std::int64_t>();
  if (x < lo || x > hi)
    return bad_param(key, std::string{"'"} + key + "' is " + std::to_string(x) + "; it must be " +
                              (hi == std::numeric_limits<std::int64_t>::max()
                                   ? "at least " + std::to_string(lo)
                                   : "in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]"));
  out = x;
  return std::nullopt;
}

std::optional<api_error> unsupported(const char* key, const std::string& why) {
  return api_error{400, std::string{"'"} + key + "' " + why + " is not supported by this server",
                   "invalid_request_error", key, "unsupported_parameter"};
}

// prompt: a string, a list of token ids, or a list holding exactly one of those.
std::optional<api_error> read_prompt(const json& body, generation_request& out) {
  if (absent(body, "prompt"))
    return bad_param("prompt", "'prompt' is required");
  const json* v = &body.at("prompt");
  if (v->is_array() && v->size() == 1 && ((*v)[0].is_string() || (*v)[0].is_array()))
    v = &(*v)[0];
  else if (v->is_array() && !v->empty() && ((*v)[0].is_string() || (*v)[0].is_array()))
    return bad_param("prompt", "one prompt per request: 'prompt' holds " + std::to_string(v->size()) + " prompts");
  if (v->is_string()) {
    out.prompt_text = v->get<std::string>();
    return std::nullopt;
  }
  if (!v->is_array())
    return bad_param("prompt", "'prompt' must be a string or a list of token ids, not " + type_name(*v));
  if (v->empty())
    return bad_param("prompt", "'prompt' is an empty list");
  for (std::size_t i = 0; i < v->size(); ++i) {
    const json& id = (*v)[i];
    if (!id.is_number_integer() || id.get<std::int64_t>() < 0 ||
        id.get<std::int64_t>() > std::numeric_limits<std::int32_t>::max())
      return bad_param("prompt", "'prompt'[" + std::to_string(i) + "] is " + id.dump() + ", not a token id");
    out.prompt_ids.push_back(std::int32_t(id.get<std::int64_t>()));
  }
  return std::nullopt;
}

// messages: [{"role": str, "content": str | null | [{"type": "text", "text": str}, …]}, …].
// Content parts are joined into one string: chat templates expect text.
std::optional<api_error> read_messages(const json& body, generation_request& out) {
  if (absent(body, "messages"))
    return bad_param("messages", "'messages' is required");
  const json& v = body.at("messages");
  if (!v.is_array() || v.empty())
    return bad_param("messages", "'messages' must be a non-empty list of messages");
  for (std::size_t i = 0; i < v.size(); ++i) {
    std::string where = "messages[" + std::to_string(i) + "]";
    const json& m = v[i];
    if (!m.is_object())
      return bad_param(where, where + " must be an object, not " + type_name(m));
    if (!m.contains("role") || !m.at("role").is_string())
      return bad_param(where + ".role", where + ".role must be a string");
    json message = m;
    const json content = m.value("content", json(nullptr));
    if (content.is_array()) {
      std::string text;
      for (std::size_t j = 0; j < content.size(); ++j) {
        const json& part = content[j];
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
            !part.at("text").is_string())
          return bad_param(where + ".content", where + ".content[" + std::to_string(j) +
                                                   "]: only {\"type\": \"text\", \"text\": …} parts are supported");
        text += part.at("text").get<std::string>();
      }
      message["content"] = text;
    } else if (!content.is_string() && !content.is_null()) {
      return bad_param(where + ".content", where + ".content must be a string or a list of text parts");
    }
    out.messages.push_back(std::move(message));
  }
  return std::nullopt;
}

std::optional<api_error> read_stop(const json& body, const request_limits& limits, generation_request& out) {
  if (absent(body, "stop"))
    return std::nullopt;
  const json& v = body.at("stop");
  if (v.is_string()) {
    out.stop.push_back(v.get<std::string>());
  } else if (v.is_array()) {
    if (v.size() > limits.max_stop_strings)
      return bad_param("stop", "'stop' holds " + std::to_string(v.size()) + " strings; at most " +
                                   std::to_string(limits.max_stop_strings) + " are allowed");
    for (const json& s : v) {
      if (!s.is_string())
        return bad_param("stop", "'stop' must be a string or a list of strings");
      out.stop.push_back(s.get<std::string>());
    }
  } else {
    return bad_param("stop", "'stop' must be a string or a list of strings, not " + type_name(v));
  }
  for (const auto& s : out.stop)
    if (s.empty())
      return bad_param("stop", "'stop' strings must not be empty");
  return std::nullopt;
}

}  // namespace

std::optional<api_error> parse_request(endpoint kind, std::string_view body_text, generation_request& out,
                                       const request_limits& limits) {
  out = generation_request{};
  out.kind = kind;
  json body = json::parse(body_text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded())
    return api_error{400, "the request body is not valid JSON", "invalid_request_error", "", "invalid_json"};
  if (!body.is_object())
    return api_error{400, "the request body must be a JSON object, not " + type_name(body), "invalid_request_error",
                     "", "invalid_json"};

  if (!absent(body, "model")) {
    if (!body.at("model").is_string())
      return bad_param("model", "'model' must be a string");
    out.model = body.at("model").get<std::string>();
  }
  if (kind == endpoint::completions) {
    if (auto e = read_prompt(body, out))
      return e;
  } else {
    if (auto e = read_messages(body, out))
      return e;
    if (auto e = read_bool(body, "add_generation_prompt", out.add_generation_prompt))
      return e;
  }

  const std::int64_t int_max = std::numeric_limits<std::int64_t>::max();
  std::optional<std::int64_t> n;
  for (const char* key : {"max_tokens", "max_completion_tokens"}) {
    if (auto e = read_int(body, key, 1, int_max, n))
      return e;
    if (n)
      out.max_tokens = std::size_t(*n);
    n.reset();
  }
  if (auto e = read_number(body, "temperature", 0.0, 2.0, false, out.temperature))
    return e;
  if (auto e = read_number(body, "top_p", 0.0, 1.0, true, out.top_p))
    return e;
  if (auto e = read_int(body, "top_k", -1, std::numeric_limits<std::int32_t>::max(), n))
    return e;
  out.top_k = n && *n > 0 ? std::int32_t(*n) : 0;
  n.reset();
  if (auto e = read_int(body, "seed", std::numeric_limits<std::int64_t>::min(), int_max, out.seed))
    return e;
  if (auto e = read_stop(body, limits, out))
    return e;
  if (auto e = read_bool(body, "ignore_eos", out.ignore_eos))
    return e;

  if (auto e = read_int(body, "n", 1, int_max, n))
    return e;
  if (n && *n != 1)
    return bad_param("n", "'n' is " + std::to_string(*n) + "; this server generates one choice per request (n = 1)");
  n.reset();
  if (auto e = read_int(body, "best_of", 1, int_max, n))
    return e;
  if (n && *n != 1)
    return unsupported("best_of", "above 1");
  n.reset();
  for (const char* key : {"presence_penalty", "frequency_penalty"}) {
    float penalty = 0;
    if (auto e = read_number(body, key, -2.0, 2.0, false, penalty))
      return e;
    if (penalty != 0)
      return unsupported(key, "other than 0");
  }
  if (!absent(body, "logit_bias") && !(body.at("logit_bias").is_object() && body.at("logit_bias").empty()))
    return unsupported("logit_bias", "");
  for (const char* key : {"tools", "functions"})
    if (!absent(body, key) && !(body.at(key).is_array() && body.at(key).empty()))
      return unsupported(key, "(tool calling)");
  if (!absent(body, "response_format")) {
    const json& f = body.at("response_format");
    if (!f.is_object() || f.value("type", "") != "text")
      return unsupported("response_format", "other than {\"type\": \"text\"}");
  }
  bool echo = false;
  if (auto e = read_bool(body, "echo", echo))
    return e;
  if (echo)
    return unsupported("echo", "true");
  if (!absent(body, "suffix") && !(body.at("suffix").is_string() && body.at("suffix").get<std::string>().empty()))
    return unsupported("suffix", "");

  if (auto e = read_bool(body, "stream", out.stream))
    return e;
  if (!absent(body, "stream_options")) {
    const json& so = body.at("stream_options");
    if (!so.is_object())
      return bad_param("stream_options", "'stream_options' must be an object");
    if (!out.stream)
      return bad_param("stream_options", "'stream_options' is only allowed when 'stream' is true");
    if (auto e = read_bool(so, "include_usage", out.include_usage); e) {
      e->param = "stream_options.include_usage";
      return e;
    }
  }

  if (kind == endpoint::completions) {
    // completions: `logprobs` is how many alternatives to return per token (0 = just the token).
    if (!absent(body, "logprobs") && body.at("logprobs").is_boolean()) {
      if (body.at("logprobs").get<bool>())
        return bad_param("logprobs", "'logprobs' of /v1/completions is an integer: alternatives per token");
    } else {
      if (auto e = read_int(body, "logprobs", 0, std::int64_t(limits.max_top_logprobs), n))
        return e;
      if (n) {
        out.logprobs = true;
        out.top_logprobs = std::size_t(*n);
      }
      n.reset();
    }
  } else {
    if (auto e = read_bool(body, "logprobs", out.logprobs))
      return e;
    if (auto e = read_int(body, "top_logprobs", 0, std::int64_t(limits.max_top_logprobs), n))
      return e;
    if (n && *n > 0 && !out.logprobs)
      return bad_param("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    out.top_logprobs = n ? std::size_t(*n) : 0;
  }
  return std::nullopt;
}

// -- responses ----------------------------------------------------------------

namespace {

json bytes_of(const std::string& text) {
  json out = json::array();
  for (unsigned char c : text)
    out.push_back(int(c));
  return out;
}

const char* object_name(endpoint kind, bool chunk) {
  if (kind == endpoint::completions)
    return "text_completion";
  return chunk ? "chat.completion.chunk" : "chat.completion";
}

json envelope(const response_meta& meta, bool chunk) {
  return {{"id", meta.id}, {"object", object_name(meta.kind, chunk)}, {"created", meta.created},
          {"model", meta.model}, {"system_fingerprint", nullptr}};
}

}  // namespace

json logprobs_json(endpoint kind, const std::vector<token_logprob>& tokens, std::size_t offset) {
  if (kind == endpoint::completions) {
    json out = {{"tokens", json::array()},
                {"token_logprobs", json::array()},
                {"top_logprobs", json::array()},
                {"text_offset", json::array()}};
    for (const token_logprob& t : tokens) {
      out["tokens"].push_back(t.token);
      out["token_logprobs"].push_back(t.logprob);
      json top = json::object();
      for (const auto& [text, lp] : t.top)
        if (!top.contains(text))  // distinct ids can share a text; the best one is kept
          top[text] = lp;
      out["top_logprobs"].push_back(std::move(top));
      out["text_offset"].push_back(offset);
      offset += t.token.size();
    }
    return out;
  }
  json content = json::array();
  for (const token_logprob& t : tokens) {
    json top = json::array();
    for (const auto& [text, lp] : t.top)
      top.push_back({{"token", text}, {"logprob", lp}, {"bytes", bytes_of(text)}});
    content.push_back({{"token", t.token}, {"logprob", t.logprob}, {"bytes", bytes_of(t.token)}, {"top_logprobs", top}});
  }
  return {{"content", std::move(content)}, {"refusal", nullptr}};
}

json usage_json(const usage_counts& usage) {
  return {{"prompt_tokens", usage.prompt_tokens},
          {"completion_tokens", usage.completion_tokens},
          {"total_tokens", usage.prompt_tokens + usage.completion_tokens}};
}

json completion_response(const response_meta& meta, const std::string& text, const char* finish_reason,
                         const usage_counts& usage, const json& logprobs) {
  json out = envelope(meta, false);
  json choice = {{"index", 0}, {"logprobs", logprobs}, {"finish_reason", finish_reason}};
  if (meta.kind == endpoint::completions)
    choice["text"] = text;
  else
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  out["choices"] = json::array({std::move(choice)});
  out["usage"] = usage_json(usage);
  return out;
}

json stream_chunk(const response_meta& meta, const std::string& text, bool first, const char* finish_reason,
                  const json& logprobs, bool include_usage) {
  json out = envelope(meta, true);
  json choice = {{"index", 0},
                 {"logprobs", logprobs},
                 {"finish_reason", finish_reason ? json(finish_reason) : json(nullptr)}};
  if (meta.kind == endpoint::completions) {
    choice["text"] = text;
  } else {
    json delta = json::object();
    if (first)
      delta["role"] = "assistant";
    if (first || !text.empty())
      delta["content"] = text;
    choice["delta"] = std::move(delta);
  }
  out["choices"] = json::array({std::move(choice)});
  if (include_usage)
    out["usage"] = nullptr;
  return out;
}

json usage_chunk(const response_meta& meta, const usage_counts& usage) {
  json out = envelope(meta, true);
  out["choices"] = json::array();
  out["usage"] = usage_json(usage);
  return out;
}

json models_response(const std::string& model, std::int64_t created, std::size_t max_model_len) {
  return {{"object", "list"},
          {"data", json::array({{{"id", model},
                                 {"object", "model"},
                                 {"created", created},
                                 {"owned_by", "moert"},
                                 {"max_model_len", max_model_len}}})}};
}

std::string sse_event(const json& payload) {
  // dump() escapes newlines inside strings, so the event stays on one line.
  return "data: " + payload.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
}

}  // namespace moert::server
