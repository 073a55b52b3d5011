// Request parsing and response shapes of the OpenAI wire format, apart from any socket.
#include <catch2/catch.hpp>

#include "server/openai_protocol.hpp"

using namespace moert::server;
using nlohmann::json;

namespace {

generation_request parse_ok(endpoint kind, const std::string& body) {
  generation_request out;
  auto err = parse_request(kind, body, out);
  INFO(body << " -> " << (err ? err->message : std::string{"ok"}));
  REQUIRE(!err);
  return out;
}

api_error parse_fails(endpoint kind, const std::string& body) {
  generation_request out;
  auto err = parse_request(kind, body, out);
  INFO(body);
  REQUIRE(err);
  return *err;
}

}  // namespace

TEST_CASE("completions: prompt as text, as token ids, or a list holding one") {
  auto r = parse_ok(endpoint::completions, R"({"model": "m", "prompt": "hello", "max_tokens": 7})");
  CHECK(r.model == "m");
  CHECK(r.prompt_text == "hello");
  CHECK(r.max_tokens == 7u);
  CHECK(r.temperature == 1.0f);  // OpenAI's default
  CHECK(!r.stream);
  r = parse_ok(endpoint::completions, R"({"prompt": [1, 2, 3]})");
  CHECK(!r.prompt_text);
  CHECK(r.prompt_ids == std::vector<std::int32_t>{1, 2, 3});
  CHECK(!r.max_tokens);
  CHECK(parse_ok(endpoint::completions, R"({"prompt": ["x"]})").prompt_text == "x");
  CHECK(parse_ok(endpoint::completions, R"({"prompt": [[4, 5]]})").prompt_ids == std::vector<std::int32_t>{4, 5});
  CHECK(parse_fails(endpoint::completions, R"({"prompt": ["a", "b"]})").param == "prompt");
  CHECK(parse_fails(endpoint::completions, R"({"prompt": [1, -2]})").param == "prompt");
  CHECK(parse_fails(endpoint::completions, R"({"prompt": [1, 2.5]})").param == "prompt");
  CHECK(parse_fails(endpoint::completions, R"({"prompt": []})").param == "prompt");
  CHECK(parse_fails(endpoint::completions, R"({"max_tokens": 3})").param == "prompt");
}

TEST_CASE("chat: messages with string or text-part content") {
  auto r = parse_ok(endpoint::chat, R"({"messages": [{"role": "system", "content": "be brief"},
      {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
      "max_completion_tokens": 5, "logprobs": true, "top_logprobs": 3})");
  REQUIRE(r.messages.size() == 2);
  CHECK(r.messages[1]["content"] == "hi there");
  CHECK(r.max_tokens == 5u);
  CHECK(r.logprobs);
  CHECK(r.top_logprobs == 3);
  CHECK(parse_fails(endpoint::chat, R"({"messages": []})").param == "messages");
  CHECK(parse_fails(endpoint::chat, R"({"messages": [{"content": "x"}]})").param == "messages[0].role");
  CHECK(parse_fails(endpoint::chat, R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})")
            .param == "messages[0].content");
  CHECK(parse_fails(endpoint::chat, R"({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})")
            .param == "top_logprobs");
}

TEST_CASE("malformed bodies and bad values are 400s that name the parameter") {
  auto e = parse_fails(endpoint::completions, "{\"prompt\": ");
  CHECK(e.status == 400);
  CHECK(e.code == "invalid_json");
  CHECK(parse_fails(endpoint::completions, "[1, 2]").code == "invalid_json");
  struct bad {
    const char* body;
    const char* param;
  };
  for (bad b : {bad{R"({"prompt": [1], "temperature": 2.5})", "temperature"},
                bad{R"({"prompt": [1], "temperature": -0.1})", "temperature"},
                bad{R"({"prompt": [1], "temperature": "hot"})", "temperature"},
                bad{R"({"prompt": [1], "top_p": 0})", "top_p"},
                bad{R"({"prompt": [1], "top_p": 1.5})", "top_p"},
                bad{R"({"prompt": [1], "max_tokens": -1})", "max_tokens"},
                bad{R"({"prompt": [1], "max_tokens": 0})", "max_tokens"},
                bad{R"({"prompt": [1], "max_tokens": 2.5})", "max_tokens"},
                bad{R"({"prompt": [1], "n": 2})", "n"},
                bad{R"({"prompt": [1], "seed": "x"})", "seed"},
                bad{R"({"prompt": [1], "stop": 5})", "stop"},
                bad{R"({"prompt": [1], "stop": ["a", "b", "c", "d", "e"]})", "stop"},
                bad{R"({"prompt": [1], "stop": [""]})", "stop"},
                bad{R"({"prompt": [1], "stream": "yes"})", "stream"},
                bad{R"({"prompt": [1], "stream_options": {"include_usage": true}})", "stream_options"},
                bad{R"({"prompt": [1], "logprobs": 21})", "logprobs"},
                bad{R"({"prompt": [1], "echo": true})", "echo"},
                bad{R"({"prompt": [1], "best_of": 3})", "best_of"},
                bad{R"({"prompt": [1], "presence_penalty": 0.5})", "presence_penalty"},
                bad{R"({"prompt": [1], "frequency_penalty": 3})", "frequency_penalty"},
                bad{R"({"prompt": [1], "logit_bias": {"5": 1}})", "logit_bias"},
                bad{R"({"prompt": [1], "model": 3})", "model"}}) {
    auto err = parse_fails(endpoint::completions, b.body);
    INFO(b.body << ": " << err.message);
    CHECK(err.status == 400);
    CHECK(err.param == b.param);
    CHECK(err.type == "invalid_request_error");
    CHECK(!err.message.empty());
  }
}

TEST_CASE("sampling, stop, streaming and logprobs options") {
  auto r = parse_ok(endpoint::completions, R"({"prompt": [1], "temperature": 0, "top_p": 0.5, "top_k": 8,
      "seed": -3, "stop": "\n", "stream": true, "stream_options": {"include_usage": true}, "logprobs": 2,
      "n": 1, "user": "ignored", "ignore_eos": true})");
  CHECK(r.temperature == 0.0f);
  CHECK(r.top_p == 0.5f);
  CHECK(r.top_k == 8);
  CHECK(r.seed == -3);
  CHECK(r.stop == std::vector<std::string>{"\n"});
  CHECK(r.stream);
  CHECK(r.include_usage);
  CHECK(r.logprobs);
  CHECK(r.top_logprobs == 2);
  CHECK(r.ignore_eos);
  CHECK(parse_ok(endpoint::completions, R"({"prompt": [1], "stop": ["a", "bc"], "top_k": -1})").top_k == 0);
  CHECK(parse_ok(endpoint::completions, R"({"prompt": [1], "logprobs": null, "stop": null})").logprobs == false);
  CHECK(parse_ok(endpoint::completions, R"({"prompt": [1], "logprobs": 0})").logprobs);
}

TEST_CASE("errors, responses and chunks in OpenAI's shapes") {
  json e = to_json(bad_param("temperature", "too hot"));
  CHECK(e["error"]["message"] == "too hot");
  CHECK(e["error"]["type"] == "invalid_request_error");
  CHECK(e["error"]["param"] == "temperature");
  CHECK(e["error"]["code"].is_null());

  response_meta meta{endpoint::completions, "cmpl-1", 1700000000, "m"};
  json r = completion_response(meta, "abc", "length", {3, 4}, nullptr);
  CHECK(r["object"] == "text_completion");
  CHECK(r["choices"][0]["text"] == "abc");
  CHECK(r["choices"][0]["finish_reason"] == "length");
  CHECK(r["choices"][0]["logprobs"].is_null());
  CHECK(r["usage"] == json{{"prompt_tokens", 3}, {"completion_tokens", 4}, {"total_tokens", 7}});

  response_meta chat{endpoint::chat, "chatcmpl-1", 1700000000, "m"};
  r = completion_response(chat, "hi", "stop", {1, 1}, nullptr);
  CHECK(r["object"] == "chat.completion");
  CHECK(r["choices"][0]["message"] == json{{"role", "assistant"}, {"content", "hi"}});

  json first = stream_chunk(chat, "", true, nullptr, nullptr, true);
  CHECK(first["object"] == "chat.completion.chunk");
  CHECK(first["choices"][0]["delta"] == json{{"role", "assistant"}, {"content", ""}});
  CHECK(first["choices"][0]["finish_reason"].is_null());
  CHECK(first.contains("usage"));
  CHECK(first["usage"].is_null());
  json last = stream_chunk(chat, "", false, "stop", nullptr, false);
  CHECK(last["choices"][0]["delta"] == json::object());
  CHECK(last["choices"][0]["finish_reason"] == "stop");
  CHECK(!last.contains("usage"));
  json usage = usage_chunk(chat, {2, 5});
  CHECK(usage["choices"] == json::array());
  CHECK(usage["usage"]["total_tokens"] == 7);

  CHECK(sse_event(json{{"a", "x\ny"}}) == "data: {\"a\":\"x\\ny\"}\n\n");
  CHECK(sse_done == "data: [DONE]\n\n");
  // Invalid UTF-8 in text never makes the dump throw.
  CHECK(sse_event(json{{"a", std::string{"\xff"}}}).find("data: ") == 0);
}

TEST_CASE("logprobs objects per endpoint") {
  std::vector<token_logprob> tokens = {{"He", -0.5f, {{"He", -0.5f}, {"She", -1.5f}}}, {"llo", -0.25f, {}}};
  json c = logprobs_json(endpoint::completions, tokens, 10);
  CHECK(c["tokens"] == json{"He", "llo"});
  CHECK(c["token_logprobs"][0] == Approx(-0.5));
  CHECK(c["top_logprobs"][0]["She"] == Approx(-1.5));
  CHECK(c["text_offset"] == json{10, 12});
  json chat = logprobs_json(endpoint::chat, tokens);
  REQUIRE(chat["content"].size() == 2);
  CHECK(chat["content"][0]["token"] == "He");
  CHECK(chat["content"][0]["bytes"] == json{72, 101});
  CHECK(chat["content"][0]["top_logprobs"][1]["token"] == "She");
  CHECK(chat["content"][1]["top_logprobs"] == json::array());
}

TEST_CASE("/v1/models lists the served model") {
  json m = models_response("moert-default", 5, 4096);
  CHECK(m["object"] == "list");
  CHECK(m["data"][0]["id"] == "moert-default");
  CHECK(m["data"][0]["object"] == "model");
}
