// What a server needs from the engine (issue [H] part 3), through the public header alone:
// finish reasons, stop and EOS ids, error codes, log-probs, timings, admission and load.
#include <catch2/catch.hpp>

#include <moert/engine.hpp>

// The public header pulls in neither CAF nor a kernel header.
#ifdef CAF_VERSION
#error "<moert/engine.hpp> includes CAF"
#endif
namespace moert::cpu {
class packed_matrix {};  // a redefinition error if gpu/cpu/gemm.hpp came in
}  // namespace moert::cpu

#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>
#include <thread>
#include <vector>

using namespace moert;

namespace {

const char* small_model = R"({"model_type": "qwen2_moe", "vocab_size": 211, "hidden_size": 48,
  "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8,
  "num_experts_per_tok": 2, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40,
  "intermediate_size": 64, "mlp_only_layers": [1], "norm_topk_prob": false)";

// small_model with extra config.json fields, e.g. `"eos_token_id": 5`.
std::string model_with(const std::string& extra) {
  return std::string{small_model} + (extra.empty() ? "" : ", " + extra) + "}";
}

std::unique_ptr<Engine> make_engine(const std::string& extra = {}, std::size_t max_inflight = 0,
                                    std::size_t kv_capacity = std::size_t{1} << 20) {
  EngineConfig config;
  config.synthetic_config = model_with(extra);
  config.weight_seed = 5;
  config.max_inflight_requests = max_inflight;
  config.kv_capacity_tokens = kv_capacity;
  auto engine = Engine::create(config);
  REQUIRE(engine.ok());
  return std::move(engine.value());
}

std::vector<TokenEvent> drain(TokenStream& stream) {
  std::vector<TokenEvent> events;
  while (auto event = stream.next())
    events.push_back(std::move(*event));
  return events;
}

std::vector<std::int32_t> tokens_of(const std::vector<TokenEvent>& events) {
  std::vector<std::int32_t> out;
  for (const auto& e : events)
    if (e.token >= 0)
      out.push_back(e.token);
  return out;
}

// Every event but the last says none; the last one says `reason`.
void check_finish(const std::vector<TokenEvent>& events, FinishReason reason) {
  REQUIRE_FALSE(events.empty());
  for (std::size_t i = 0; i + 1 < events.size(); ++i) {
    CHECK_FALSE(events[i].last);
    CHECK(events[i].finish_reason == FinishReason::none);
    CHECK(events[i].index == i);
  }
  CHECK(events.back().last);
  CHECK(events.back().finish_reason == reason);
}

Request greedy_request(std::uint64_t id, std::size_t n) {
  Request r;
  r.id = id;
  r.prompt = {1, 2, 3, 4, 5};
  r.max_new_tokens = n;
  return r;
}

// The tokens of a greedy request on an engine without an EOS.
std::vector<std::int32_t> plain_tokens(std::size_t n) {
  auto engine = make_engine();
  auto out = engine->submit(greedy_request(1, n))->wait();
  REQUIRE(out.ok());
  return *out;
}

std::size_t first_index_of(const std::vector<std::int32_t>& tokens, std::int32_t token) {
  return std::size_t(std::find(tokens.begin(), tokens.end(), token) - tokens.begin());
}

// Log-softmax in long double, independent of the engine's own.
long double reference_logprob(const std::vector<float>& logits, std::int32_t token) {
  long double max = *std::max_element(logits.begin(), logits.end()), sum = 0;
  for (float v : logits)
    sum += std::exp((long double)v - max);
  return (long double)logits[std::size_t(token)] - max - std::log(sum);
}

}  // namespace

TEST_CASE("the engine tells its model's vocabulary, context and EOS") {
  auto engine = make_engine(R"("max_position_embeddings": 512, "eos_token_id": [7, 9, 4000])");
  CHECK(engine->vocab_size() == 211);
  CHECK(engine->max_context_tokens() == 512);
  CHECK(engine->eos_token_ids() == std::vector<std::int32_t>{7, 9});  // 4000 is not in the vocabulary
  auto plain = make_engine();
  CHECK(plain->eos_token_ids().empty());
  CHECK(plain->max_context_tokens() == 4096);  // config.json's default
  auto single = make_engine(R"("eos_token_id": 3)");
  CHECK(single->eos_token_ids() == std::vector<std::int32_t>{3});
  EngineConfig bad;
  bad.synthetic_config = model_with(R"("eos_token_id": "</s>")");
  auto refused = Engine::create(bad);
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.err().message.find("eos_token_id") != std::string::npos);
}

TEST_CASE("finish reasons: length, stop by stop_token_ids, stop by the config's EOS, cancelled") {
  const std::size_t n = 12;
  auto plain = plain_tokens(n);
  REQUIRE(plain.size() == n);

  SECTION("length") {
    auto engine = make_engine();
    auto events = drain(*engine->submit(greedy_request(3, n)));
    check_finish(events, FinishReason::length);
    CHECK(tokens_of(events) == plain);
    CHECK(events.back().token == plain.back());  // the last event carries the last token
    engine->shutdown();
    CHECK(engine->report().finished_length == 1);
  }

  SECTION("stop_token_ids: the stop token is emitted as the last event") {
    auto engine = make_engine();
    std::int32_t stop = plain[4];
    std::size_t at = first_index_of(plain, stop);
    Request r = greedy_request(3, n);
    r.stop_token_ids = {stop};
    auto events = drain(*engine->submit(r));
    check_finish(events, FinishReason::stop);
    CHECK(tokens_of(events) == std::vector<std::int32_t>(plain.begin(), plain.begin() + std::ptrdiff_t(at + 1)));
    CHECK(events.back().token == stop);
    engine->shutdown();
    CHECK(engine->report().finished_stop == 1);
  }

  SECTION("the EOS of config.json stops generation unless ignore_eos") {
    std::int32_t eos = plain[6];
    std::size_t at = first_index_of(plain, eos);
    auto engine = make_engine("\"eos_token_id\": [" + std::to_string(eos) + "]");
    auto events = drain(*engine->submit(greedy_request(3, n)));
    check_finish(events, FinishReason::stop);
    CHECK(tokens_of(events) == std::vector<std::int32_t>(plain.begin(), plain.begin() + std::ptrdiff_t(at + 1)));
    CHECK(events.back().token == eos);

    Request ignoring = greedy_request(4, n);
    ignoring.ignore_eos = true;
    events = drain(*engine->submit(ignoring));
    check_finish(events, FinishReason::length);
    CHECK(tokens_of(events) == plain);
  }

  SECTION("cancelled") {
    auto engine = make_engine();
    auto stream = engine->submit(greedy_request(9, 3000));
    auto first = stream->next();
    REQUIRE(first);
    CHECK(first->token >= 0);
    engine->cancel(9);
    auto events = drain(*stream);
    REQUIRE_FALSE(events.empty());
    CHECK(events.back().last);
    CHECK(events.back().finish_reason == FinishReason::cancelled);
    CHECK(events.back().error_code == ErrorCode::none);
    CHECK(events.back().token == -1);
    CHECK(events.size() < 3000);
    CHECK(stream->finish_reason() == FinishReason::cancelled);
    engine->cancel(9);   // ended: ignored
    engine->cancel(12345);  // unknown: ignored
    engine->shutdown();
    engine->cancel(9);  // after shutdown: ignored, no crash
    CHECK(engine->report().cancelled == 1);
  }
}

TEST_CASE("logprobs are the log-softmax of the logits the token was drawn from; top_logprobs sorted") {
  auto engine = make_engine();
  for (bool sampled : {false, true}) {
    INFO((sampled ? "sampled" : "greedy"));
    Request r = greedy_request(sampled ? 21 : 20, 10);
    if (sampled)
      r.sampling = {0.9f, 0, 0.95f, 3};
    r.logprobs = true;
    r.top_logprobs = 5;
    r.return_logits = true;
    auto events = drain(*engine->submit(r));
    REQUIRE(events.size() == 10);
    for (const TokenEvent& e : events) {
      INFO("index " << e.index);
      REQUIRE(e.logits.size() == 211);
      CHECK(std::abs((long double)e.logprob - reference_logprob(e.logits, e.token)) < 1e-5L);
      CHECK(e.logprob <= 0.0f);
      REQUIRE(e.top_logprobs.size() == 5);
      for (std::size_t i = 0; i < e.top_logprobs.size(); ++i) {
        const TopLogprob& t = e.top_logprobs[i];
        CHECK(std::abs((long double)t.logprob - reference_logprob(e.logits, t.token)) < 1e-5L);
        if (i > 0)
          CHECK(e.top_logprobs[i - 1].logprob >= t.logprob);
      }
      // They are the 5 best: nothing outside beats the fifth.
      float fifth = e.logits[std::size_t(e.top_logprobs.back().token)];
      std::size_t better = 0;
      for (float v : e.logits)
        better += v > fifth;
      CHECK(better <= 4);
      if (!sampled) {
        CHECK(e.top_logprobs.front().token == e.token);
        CHECK(e.top_logprobs.front().logprob == e.logprob);
      }
    }
    // Asking for log-probs changes no token: the same id again without them.
    Request again = r;
    again.logprobs = false;
    again.top_logprobs = 0;
    again.return_logits = false;
    auto without = drain(*engine->submit(again));
    CHECK(tokens_of(without) == tokens_of(events));
    for (const TokenEvent& e : without) {
      CHECK(e.logits.empty());
      CHECK(e.top_logprobs.empty());
    }
  }
  Request too_many = greedy_request(30, 2);
  too_many.top_logprobs = 21;
  auto events = drain(*engine->submit(too_many));
  REQUIRE(events.size() == 1);
  CHECK(events[0].error_code == ErrorCode::invalid_request);
  CHECK(events[0].finish_reason == FinishReason::error);
}

TEST_CASE("error codes: invalid_request, context_too_long, shutdown") {
  auto engine = make_engine(R"("max_position_embeddings": 64)");
  auto only_event = [&](Request r) {
    auto events = drain(*engine->submit(std::move(r)));
    REQUIRE(events.size() == 1);
    CHECK(events[0].last);
    CHECK(events[0].token == -1);
    CHECK(events[0].finish_reason == FinishReason::error);
    CHECK_FALSE(events[0].error.empty());
    return events[0];
  };
  Request empty = greedy_request(1, 4);
  empty.prompt.clear();
  CHECK(only_event(empty).error_code == ErrorCode::invalid_request);

  Request long_prompt = greedy_request(2, 4);
  long_prompt.prompt.assign(70, 1);
  TokenEvent e = only_event(long_prompt);
  CHECK(e.error_code == ErrorCode::context_too_long);
  CHECK(e.error.find("70") != std::string::npos);
  CHECK(e.error.find("64") != std::string::npos);

  Request too_many = greedy_request(3, 60);  // 5 + 60 > 64
  e = only_event(too_many);
  CHECK(e.error_code == ErrorCode::context_too_long);
  CHECK(e.error.find("60") != std::string::npos);
  CHECK(e.error.find("64") != std::string::npos);

  Request huge = greedy_request(4, std::size_t(-1));
  CHECK(only_event(huge).error_code == ErrorCode::context_too_long);

  Request fits = greedy_request(5, 59);  // 5 + 59 = 64
  auto events = drain(*engine->submit(fits));
  check_finish(events, FinishReason::length);
  CHECK(events.size() == 59);

  engine->shutdown();
  CHECK(only_event(greedy_request(6, 2)).error_code == ErrorCode::shutdown);
  CHECK(engine->report().errors == 5);
}

TEST_CASE("max_inflight_requests: beyond it submit() answers overloaded at once") {
  auto engine = make_engine({}, 2);
  auto a = engine->submit(greedy_request(1, 3000));
  auto b = engine->submit(greedy_request(2, 3000));
  auto started = std::chrono::steady_clock::now();
  auto c = engine->submit(greedy_request(3, 4));
  REQUIRE(c->done());  // answered inside submit(), no waiting
  CHECK(std::chrono::steady_clock::now() - started < std::chrono::milliseconds{50});
  auto events = drain(*c);
  REQUIRE(events.size() == 1);
  CHECK(events[0].error_code == ErrorCode::overloaded);
  CHECK(events[0].finish_reason == FinishReason::error);
  CHECK(events[0].error.find("2") != std::string::npos);
  engine->cancel(1);
  engine->cancel(2);
  CHECK(drain(*a).back().finish_reason == FinishReason::cancelled);
  CHECK(drain(*b).back().finish_reason == FinishReason::cancelled);
  // Room again as soon as those streams ended.
  events = drain(*engine->submit(greedy_request(3, 4)));
  check_finish(events, FinishReason::length);
}

TEST_CASE("load() counts running and waiting requests") {
  // Room for one 903-token reservation per shard: the second and third request wait.
  auto engine = make_engine({}, 0, 1000);
  CHECK(engine->load().running == 0);
  CHECK(engine->load().waiting == 0);
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (std::uint64_t id = 1; id <= 3; ++id) {
    Request r = greedy_request(id, 898);
    streams.push_back(engine->submit(r));
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds{5};
  EngineLoad load;
  while (std::chrono::steady_clock::now() < deadline) {
    load = engine->load();
    if (load.running == 1 && load.waiting == 2)
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds{1});
  }
  CHECK(load.running == 1);
  CHECK(load.waiting == 2);
  // A queued request cancels without ever running: it waited its whole life.
  engine->cancel(3);
  auto events = drain(*streams[2]);
  REQUIRE(events.size() == 1);
  CHECK(events[0].finish_reason == FinishReason::cancelled);
  CHECK(events[0].timings.queue_wait_ms == events[0].timings.total_ms);
  engine->cancel(1);
  engine->cancel(2);
  for (auto& s : streams)
    drain(*s);
  engine->shutdown();
  CHECK(engine->load().running == 0);
  CHECK(engine->load().waiting == 0);
}

TEST_CASE("timings on the last event are non-negative and ordered") {
  auto engine = make_engine();
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (std::uint64_t id = 1; id <= 8; ++id)
    streams.push_back(engine->submit(greedy_request(id, 1 + id % 5)));
  for (auto& stream : streams) {
    auto events = drain(*stream);
    REQUIRE_FALSE(events.empty());
    for (std::size_t i = 0; i + 1 < events.size(); ++i)
      CHECK(events[i].timings.total_ms == 0);  // last event only
    const RequestTimings& t = events.back().timings;
    INFO("queue " << t.queue_wait_ms << " ttft " << t.time_to_first_token_ms << " tbt "
                  << t.mean_time_between_tokens_ms << " total " << t.total_ms);
    CHECK(t.queue_wait_ms >= 0);
    CHECK(t.queue_wait_ms <= t.time_to_first_token_ms);
    CHECK(t.time_to_first_token_ms > 0);
    CHECK(t.time_to_first_token_ms <= t.total_ms);
    CHECK(t.mean_time_between_tokens_ms >= 0);
    CHECK(t.time_to_first_token_ms + t.mean_time_between_tokens_ms * double(events.size() - 1) <=
          t.total_ms + 1e-6);
    if (events.size() == 1)
      CHECK(t.mean_time_between_tokens_ms == 0);
  }
}

TEST_CASE("an id reused at once after its end, many times over, from several threads") {
  auto engine = make_engine();
  std::vector<std::thread> clients;
  std::vector<std::string> failures(4);
  for (std::size_t c = 0; c < 4; ++c)
    clients.emplace_back([&, c] {
      for (int round = 0; round < 100; ++round) {
        auto events = drain(*engine->submit(greedy_request(500 + c, 1 + round % 3)));
        if (events.empty() || events.back().finish_reason != FinishReason::length) {
          failures[c] = "round " + std::to_string(round) + ": " +
                        (events.empty() ? std::string{"no event"} : events.back().error);
          return;
        }
      }
    });
  for (auto& t : clients)
    t.join();
  for (const auto& f : failures)
    CHECK(f.empty());
  engine->shutdown();
  CHECK(engine->report().finished_length == 400);
}
