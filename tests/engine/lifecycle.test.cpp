// Request-lifecycle defects of issue [E], each a regression test written before its fix:
// a request whose KV need overflows size_t, an id reused the moment its stream ended.
#include <catch2/catch.hpp>

#include "engine/engine.hpp"
#include "test_support.hpp"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <cstdint>
#include <limits>
#include <thread>

using namespace moert;

namespace {

const char* small_model = test::small_moe_model;

// Waits at most `limit` for the stream to end; a stream still running is cancelled so the
// test fails instead of hanging.
bool ends_within(Engine& engine, std::uint64_t id, TokenStream& stream, std::chrono::seconds limit) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (!stream.done()) {
    if (std::chrono::steady_clock::now() > deadline) {
      engine.cancel(id);
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds{1});
  }
  return true;
}

}  // namespace

TEST_CASE("max_new_tokens = SIZE_MAX is refused at once instead of wrapping the KV reservation") {
  EngineConfig config;
  config.synthetic_config = small_model;
  auto engine = Engine::create(config);
  REQUIRE(engine.ok());
  Request request;
  request.id = 5;
  request.prompt = {1, 2, 3};
  request.max_new_tokens = std::numeric_limits<std::size_t>::max();
  auto stream = (*engine)->submit(request);
  REQUIRE(ends_within(**engine, 5, *stream, std::chrono::seconds{5}));
  auto out = stream->wait();
  REQUIRE_FALSE(out.ok());
  (*engine)->shutdown();
}

TEST_CASE("a prompt beyond max_position_embeddings is refused") {
  EngineConfig config;
  config.synthetic_config = R"({"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 16,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
    "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8,
    "max_position_embeddings": 32})";
  auto engine = Engine::create(config);
  REQUIRE(engine.ok());
  auto stream = (*engine)->submit({7, std::vector<std::int32_t>(40, 1), 2, {}, false});
  REQUIRE(ends_within(**engine, 7, *stream, std::chrono::seconds{5}));
  CHECK_FALSE(stream->wait().ok());
  stream = (*engine)->submit({8, std::vector<std::int32_t>(30, 1), 3, {}, false});  // 30 + 3 > 32
  REQUIRE(ends_within(**engine, 8, *stream, std::chrono::seconds{5}));
  CHECK_FALSE(stream->wait().ok());
  stream = (*engine)->submit({9, std::vector<std::int32_t>(30, 1), 2, {}, false});  // 30 + 2 fits
  auto fits = stream->wait();
  CHECK(fits.ok());
  (*engine)->shutdown();
}

TEST_CASE("an id is reusable the moment its stream has ended") {
  EngineConfig config;
  config.synthetic_config = small_model;
  config.attention_devices = 2;
  // Room for one request per shard: a KV reservation lost to the race makes the next wait.
  config.kv_capacity_tokens = 8;
  auto engine = Engine::create(config);
  REQUIRE(engine.ok());
  std::vector<std::int32_t> first_tokens;
  for (int round = 0; round < 300; ++round) {
    INFO("round " << round);
    auto stream = (*engine)->submit({77, {1, 2, 3}, 2, {}, false});
    REQUIRE(ends_within(**engine, 77, *stream, std::chrono::seconds{5}));
    auto tokens = stream->wait();
    if (!tokens.ok())
      FAIL(tokens.err().message);
    REQUIRE(tokens->size() == 2);
    if (round == 0)
      first_tokens = *tokens;
    REQUIRE(*tokens == first_tokens);
  }
  (*engine)->shutdown();
}

TEST_CASE("an id is reusable from the callback that hears its last event") {
  EngineConfig config;
  config.synthetic_config = small_model;
  config.attention_devices = 2;
  config.kv_capacity_tokens = 8;
  auto engine = Engine::create(config);
  REQUIRE(engine.ok());
  // Each last event submits the next round under the same id, from the engine's thread.
  constexpr int rounds = 200;
  std::mutex mutex;
  std::condition_variable finished;
  std::vector<std::string> errors;
  int completed = 0;
  std::function<void()> submit_round = [&] {
    (*engine)->submit({78, {4, 5, 6}, 2, {}, false}, [&](const TokenEvent& event) {
      if (!event.last)
        return;
      bool again = false;
      {
        std::lock_guard<std::mutex> guard{mutex};
        if (!event.error.empty())
          errors.push_back(event.error);
        again = ++completed < rounds && errors.empty();
      }
      if (again)
        submit_round();
      else
        finished.notify_all();
    });
  };
  submit_round();
  std::unique_lock<std::mutex> lock{mutex};
  bool ended = finished.wait_for(lock, std::chrono::seconds{60},
                                 [&] { return completed == rounds || !errors.empty(); });
  lock.unlock();
  REQUIRE(ended);
  CHECK(errors.empty());
  if (!errors.empty())
    FAIL(errors.front());
  CHECK(completed == rounds);
  (*engine)->shutdown();
}

// Engine::cancel used to read the ingress handle without the lock that shutdown() resets it
// under (a data race on a reference-counted handle). Not deterministic: a smoke test, most
// telling under ASan/TSan.
TEST_CASE("cancel from other threads while the engine shuts down") {
  for (int round = 0; round < 20; ++round) {
    EngineConfig config;
    config.synthetic_config = small_model;
    auto engine = Engine::create(config);
    REQUIRE(engine.ok());
    auto stream = (*engine)->submit({3, {1, 2}, 40, {}, false});
    std::atomic<bool> stop{false};
    std::vector<std::thread> cancellers;
    for (int t = 0; t < 2; ++t)
      cancellers.emplace_back([&] {
        while (!stop)
          (*engine)->cancel(3);
      });
    (*engine)->shutdown();
    stop = true;
    for (auto& t : cancellers)
      t.join();
    CHECK(stream->done());
  }
}
