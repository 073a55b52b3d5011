// Supervision (issue [E]): an expert actor (one per routed expert), every expert actor of a
// device, a μ-queue or an attention-shard actor killed mid-generation (CAF exit_reason::kill,
// through Engine::kill_actor) is re-created by the supervisor and its work replayed, so every
// request completes with exactly the tokens and logits of the fault-free run; past the restart
// limit with no expert device left every request ends with an error naming what died, and
// nothing hangs (a dead actor used to leave its requests silent and shutdown() waiting
// forever). Prints the recovery time of each kill: kill -> the next token of any request.
#include <catch2/catch.hpp>

#include "engine/engine.hpp"
#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace moert;

namespace {

const char* small_model = test::small_moe_model;

constexpr std::size_t num_requests = 6;
constexpr std::size_t new_tokens = 24;
constexpr auto end_limit = std::chrono::seconds{30};

using clock_type = std::chrono::steady_clock;

struct outcome {
  std::vector<std::int32_t> tokens;
  std::vector<std::vector<float>> logits;
  std::size_t last_events = 0;
  ErrorCode error = ErrorCode::none;
  std::string message;
};

EngineConfig config_of() {
  EngineConfig config;
  config.synthetic_config = small_model;
  config.attention_devices = 2;
  config.expert_devices = 2;
  config.plan = {2, 0, 2, policy::segment_order::aass};  // two micro-batches, two A2E chunks
  return config;
}

// Runs the workload; `fault` (may be empty) runs on the test thread once `after_tokens`
// tokens have come out. Records every event and the time of each token.
struct run {
  std::unique_ptr<Engine> engine;
  std::vector<outcome> outcomes = std::vector<outcome>(num_requests);
  std::mutex mutex;  // guards outcomes and token_times (events come from engine threads)
  std::vector<clock_type::time_point> token_times;
  std::atomic<std::size_t> tokens_seen{0};
  std::vector<std::shared_ptr<TokenStream>> streams;

  explicit run(EngineConfig config) {
    auto made = Engine::create(std::move(config));
    REQUIRE(made.ok());
    engine = std::move(*made);
  }

  void submit_all() {
    for (std::size_t r = 0; r < num_requests; ++r) {
      Request request;
      request.id = 100 + r;
      request.prompt = {std::int32_t(5 + r), 17, std::int32_t(40 + 3 * r), 2, 9};
      request.max_new_tokens = new_tokens;
      request.sampling = {0.9f, 20, 0.95f, 1234};  // sampled, keyed by (seed, id, position)
      request.ignore_eos = true;
      request.return_logits = true;
      streams.push_back(engine->submit(request, [this, r](const TokenEvent& e) {
        std::lock_guard<std::mutex> guard{mutex};
        outcome& o = outcomes[r];
        if (e.token >= 0) {
          o.tokens.push_back(e.token);
          o.logits.push_back(e.logits);
          token_times.push_back(clock_type::now());
          ++tokens_seen;
        }
        if (e.last) {
          ++o.last_events;
          o.error = e.error_code;
          o.message = e.error;
        }
      }));
    }
  }

  bool all_ended() {
    auto deadline = clock_type::now() + end_limit;
    for (auto& stream : streams)
      while (!stream->done()) {
        if (clock_type::now() > deadline)
          return false;
        std::this_thread::sleep_for(std::chrono::milliseconds{1});
      }
    return true;
  }

  bool wait_tokens(std::size_t n) {
    auto deadline = clock_type::now() + end_limit;
    while (tokens_seen.load() < n) {
      if (clock_type::now() > deadline)
        return false;
      std::this_thread::sleep_for(std::chrono::microseconds{200});
    }
    return true;
  }

  // The first token that came out after `t`, in ms after it; negative if none.
  double next_token_after(clock_type::time_point t) {
    std::lock_guard<std::mutex> guard{mutex};
    for (auto at : token_times)
      if (at > t)
        return std::chrono::duration<double, std::milli>(at - t).count();
    return -1;
  }
};

std::vector<outcome> fault_free() {
  run r{config_of()};
  r.submit_all();
  REQUIRE(r.all_ended());
  r.engine->shutdown();
  return r.outcomes;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("a killed expert, mu_queue or attention shard is recovered; outputs stay bit-identical") {
  const std::vector<outcome> reference = fault_free();
  for (const auto& o : reference) {
    REQUIRE(o.tokens.size() == new_tokens);
    REQUIRE(o.error == ErrorCode::none);
  }
  struct kill_case {
    const char* kind;
    std::size_t device;      // the expert id for "expert"
    std::uint64_t restarts;  // actors re-created
  };
  // 8 experts on 2 expert devices: 4 expert actors each.
  for (kill_case k : {kill_case{"expert", 1, 1}, kill_case{"queue", 0, 1}, kill_case{"attention", 1, 1},
                      kill_case{"expert", 6, 1}, kill_case{"expert_device", 0, 4}}) {
    SECTION(std::string("kill ") + k.kind + " " + std::to_string(k.device)) {
      run r{config_of()};
      r.submit_all();
      // Mid-generation: every request has some tokens, none is done.
      REQUIRE(r.wait_tokens(num_requests * 4));
      auto killed_at = clock_type::now();
      REQUIRE(r.engine->kill_actor(k.kind, k.device).ok());
      REQUIRE(r.all_ended());
      double recovery_ms = r.next_token_after(killed_at);
      EngineReport report = r.engine->report();
      std::printf("supervision: kill %s %zu: next token %.3f ms after the kill; supervisor restart %.3f ms; "
                  "restarts %llu\n",
                  k.kind, k.device, recovery_ms, report.last_restart_ms, (unsigned long long)report.restarts);
      CHECK(report.restarts == k.restarts);
      CHECK_FALSE(report.supervision_escalated);
      CHECK(recovery_ms >= 0);
      CHECK(recovery_ms < 1000);
      std::lock_guard<std::mutex> guard{r.mutex};
      for (std::size_t i = 0; i < num_requests; ++i) {
        const outcome& got = r.outcomes[i];
        INFO("request " << i << ": " << got.message);
        CHECK(got.last_events == 1);
        CHECK(got.error == ErrorCode::none);
        CHECK(got.tokens == reference[i].tokens);
        REQUIRE(got.logits.size() == reference[i].logits.size());
        bool logits_same = true;
        for (std::size_t t = 0; t < got.logits.size(); ++t)
          logits_same = logits_same && same_bits(got.logits[t], reference[i].logits[t]);
        CHECK(logits_same);
      }
      r.engine->shutdown();
    }
  }
}

TEST_CASE("past the restart limit with no expert device left every request ends with an error naming the death") {
  EngineConfig config = config_of();
  config.max_restarts = 1;
  run r{config};
  r.submit_all();
  REQUIRE(r.wait_tokens(num_requests * 2));
  auto wait_restarts = [&](std::uint64_t n) {
    auto deadline = clock_type::now() + end_limit;
    while (r.engine->report().restarts < n && clock_type::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds{1});
    return r.engine->report().restarts >= n;
  };
  REQUIRE(r.engine->kill_actor("expert", 0).ok());  // restarted
  REQUIRE(wait_restarts(1));
  // Its replacement: one too many, so device 0 is lost and its 4 experts go to device 1.
  REQUIRE(r.engine->kill_actor("expert", 0).ok());
  REQUIRE(wait_restarts(5));
  CHECK_FALSE(r.engine->report().supervision_escalated);
  REQUIRE(r.engine->kill_actor("expert", 1).ok());  // on device 1, the last one
  REQUIRE(wait_restarts(6));
  REQUIRE(r.engine->kill_actor("expert", 1).ok());  // none left to re-place it on
  REQUIRE(r.all_ended());
  {
    std::lock_guard<std::mutex> guard{r.mutex};
    for (const outcome& o : r.outcomes) {
      INFO(o.message);
      CHECK(o.last_events == 1);
      if (o.error != ErrorCode::none) {  // a request may have finished before the second kill
        CHECK(o.error == ErrorCode::internal);
        CHECK(o.message.find("supervision gave up") != std::string::npos);
        CHECK(o.message.find("expert 1 died") != std::string::npos);
        CHECK(o.message.find("no expert device survives") != std::string::npos);
      }
    }
  }
  Request late;
  late.prompt = {1, 2, 3};
  late.max_new_tokens = 2;
  auto refused = r.engine->submit(late);
  auto out = refused->wait();  // refused at the ingress, without generating
  CHECK_FALSE(out.ok());
  EngineReport report = r.engine->report();
  CHECK(report.supervision_escalated);
  auto started = clock_type::now();
  r.engine->shutdown();
  CHECK(clock_type::now() - started < std::chrono::seconds{5});
}

TEST_CASE("kill_actor names a bad kind or device") {
  run r{config_of()};
  auto bad = r.engine->kill_actor("router", 0);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.err().message.find("router") != std::string::npos);
  CHECK_FALSE(r.engine->kill_actor("expert", 9).ok());  // 8 experts
  CHECK_FALSE(r.engine->kill_actor("expert_device", 2).ok());
  CHECK(r.engine->kill_actor("expert", 7).ok());
  r.engine->shutdown();
}
