// At-least-once A2E/E2A delivery without a fault plan (issue [E] part 3): the engine always
// runs its retransmission, with the generous timeouts of transport::without_faults, so a
// message lost anyway (here through the test-only drop seam, fault_injector::
// drop_next_for_testing) is asked again and the output is bit-identical to the run that lost
// nothing.
#include <catch2/catch.hpp>

#include "engine/engine.hpp"
#include "test_support.hpp"

#include <chrono>
#include <mutex>
#include <thread>

using namespace moert;

namespace {

struct outcome {
  std::vector<std::vector<std::int32_t>> tokens;
  std::vector<std::vector<std::vector<float>>> logits;
  std::vector<std::string> errors;
  EngineReport report;
  double seconds = 0;
};

// Three requests (one sampled), every event recorded off the test thread.
outcome run(std::uint64_t drops) {
  EngineConfig config;
  config.synthetic_config = test::small_moe_model;
  config.attention_devices = 2;
  config.expert_devices = 2;
  outcome out;
  auto engine = Engine::create(config);
  if (!engine.ok()) {
    out.errors.push_back("Engine::create: " + engine.err().message);
    return out;
  }
  out.tokens.resize(3);
  out.logits.resize(3);
  out.errors.resize(3);
  std::mutex mutex;
  transport::fault_injector::drop_next_for_testing(drops);
  auto start = std::chrono::steady_clock::now();
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (std::size_t i = 0; i < 3; ++i) {
    Request r;
    r.id = i + 1;
    r.prompt = {std::int32_t(3 + i), 17, 40, std::int32_t(90 + i)};
    r.max_new_tokens = 4;
    r.ignore_eos = true;
    r.return_logits = true;
    if (i == 1)
      r.sampling = {0.8f, 40, 0.95f, 77};
    streams.push_back((*engine)->submit(r, [&, i](const TokenEvent& e) {
      std::lock_guard<std::mutex> guard{mutex};
      if (e.token >= 0) {
        out.tokens[i].push_back(e.token);
        out.logits[i].push_back(e.logits);
      }
      if (!e.error.empty())
        out.errors[i] = e.error;
    }));
  }
  auto deadline = start + std::chrono::seconds{60};
  for (auto& s : streams)
    while (!s->done() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds{1});
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  transport::fault_injector::drop_next_for_testing(0);
  for (std::size_t i = 0; i < streams.size(); ++i)
    if (!streams[i]->done())
      out.errors[i] = "did not end within 60 s";
  (*engine)->shutdown();
  out.report = (*engine)->report();
  return out;
}

}  // namespace

TEST_CASE("at-least-once without a plan: lost A2E/E2A messages are sent again, output bit-identical") {
  outcome clean = run(0);
  for (const auto& e : clean.errors)
    REQUIRE(e.empty());
  CHECK_FALSE(clean.report.faults_enabled);
  CHECK(clean.report.faults.retransmitted == 0);  // nothing was lost: nothing sent twice
  CHECK(clean.report.faults.messages > 0);

  // The first three data messages of the run are lost (the first A2E of each shard among them).
  outcome lossy = run(3);
  for (const auto& e : lossy.errors)
    REQUIRE(e.empty());
  std::printf("at-least-once, no plan: 3 messages dropped, %llu A2E retransmitted, %llu E2A entries ignored; "
              "3 requests x 4 tokens in %.2f s (lossless: %.2f s)\n",
              (unsigned long long)lossy.report.faults.retransmitted,
              (unsigned long long)lossy.report.faults.ignored_e2a, lossy.seconds, clean.seconds);
  CHECK_FALSE(lossy.report.faults_enabled);
  CHECK(lossy.report.faults.dropped == 3);
  CHECK(lossy.report.faults.retransmitted >= 1);
  CHECK(lossy.report.faults.failed_batches == 0);
  CHECK(lossy.tokens == clean.tokens);
  CHECK(lossy.logits == clean.logits);  // bit for bit
  // The first retransmission waits 1 s (without_faults): recovered, and not much later.
  CHECK(lossy.seconds >= 0.9);
  CHECK(lossy.seconds < 15);
}
