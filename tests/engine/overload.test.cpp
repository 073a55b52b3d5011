// Overload (issue [E] part 4): admission by in-flight requests and by queued prompt tokens,
// per-request deadlines, each refusal with its own error code; a 10x burst over the in-flight
// limit: every request ends exactly once (completed or rejected, none lost or answered twice),
// the engine's load stays within its limit, and the rejection latency and peak RSS are printed.
#include <catch2/catch.hpp>

#include "engine/engine.hpp"
#include "test_support.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using namespace moert;

namespace {

const std::string small_model = test::small_moe_model_with(R"("max_position_embeddings": 100000)");

using clock_type = std::chrono::steady_clock;

bool ends_within(TokenStream& stream, std::chrono::seconds limit) {
  auto deadline = clock_type::now() + limit;
  while (!stream.done()) {
    if (clock_type::now() > deadline)
      return false;
    std::this_thread::sleep_for(std::chrono::milliseconds{1});
  }
  return true;
}

std::size_t rss_kib(const char* field) {  // VmRSS / VmHWM of this process, KiB
  std::ifstream status{"/proc/self/status"};
  std::string line;
  while (std::getline(status, line))
    if (line.rfind(field, 0) == 0)
      return std::stoul(line.substr(std::string(field).size()));
  return 0;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty())
    return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, std::size_t(p * double(v.size())))];
}

}  // namespace

TEST_CASE("10x overload: every request ends once, completed or rejected with overloaded; load bounded") {
  constexpr std::size_t limit = 8, rounds = 6, burst = 10 * limit;
  EngineConfig config;
  config.synthetic_config = small_model;
  config.attention_devices = 2;
  config.expert_devices = 2;
  config.max_inflight_requests = limit;
  auto made = Engine::create(config);
  REQUIRE(made.ok());
  Engine& engine = **made;
  std::mutex mutex;
  std::vector<std::size_t> last_events;  // per request
  std::vector<double> rejection_ms;
  std::size_t completed = 0, rejected = 0, other = 0, max_live = 0;
  std::vector<std::shared_ptr<TokenStream>> streams;
  std::size_t rss_after_first = 0;
  for (std::size_t round = 0; round < rounds; ++round) {
    for (std::size_t i = 0; i < burst; ++i) {
      std::size_t idx = last_events.size();
      {
        std::lock_guard<std::mutex> guard{mutex};
        last_events.push_back(0);
      }
      Request request;
      request.prompt = {std::int32_t(1 + i % 50), 7, 9};
      request.max_new_tokens = 6;
      request.ignore_eos = true;
      streams.push_back(engine.submit(request, [&, idx](const TokenEvent& e) {
        if (!e.last)
          return;
        std::lock_guard<std::mutex> guard{mutex};
        ++last_events[idx];
        if (e.error_code == ErrorCode::overloaded) {
          ++rejected;
          rejection_ms.push_back(e.timings.total_ms);
        } else if (e.error_code == ErrorCode::none) {
          ++completed;
        } else {
          ++other;
        }
      }));
      EngineLoad load = engine.load();
      max_live = std::max(max_live, load.running + load.waiting);
    }
    for (auto& s : streams)
      REQUIRE(ends_within(*s, std::chrono::seconds{30}));
    if (round == 0)
      rss_after_first = rss_kib("VmRSS:");
  }
  std::size_t rss_end = rss_kib("VmRSS:"), hwm = rss_kib("VmHWM:");
  std::lock_guard<std::mutex> guard{mutex};
  std::printf("overload 10x: %zu submitted, %zu completed, %zu rejected (overloaded), %zu other; rejection latency "
              "p50 %.4f ms p99 %.4f ms; RSS after round 1 %zu KiB, at the end %zu KiB, peak %zu KiB; max live %zu\n",
              last_events.size(), completed, rejected, other, percentile(rejection_ms, 0.5),
              percentile(rejection_ms, 0.99), rss_after_first, rss_end, hwm, max_live);
  CHECK(completed + rejected == rounds * burst);
  CHECK(other == 0);
  CHECK(completed >= rounds * limit);  // at least the limit's worth per burst got through
  CHECK(std::all_of(last_events.begin(), last_events.end(), [](std::size_t n) { return n == 1; }));
  CHECK(max_live <= limit);
  CHECK(percentile(rejection_ms, 0.99) < 50.0);
  // Bounded: five more bursts grow the resident set by less than 32 MiB.
  CHECK(rss_end < rss_after_first + 32 * 1024);
  engine.shutdown();

  // Bounded mailboxes: what can be queued at each hot actor follows from the admission limit
  // and the plan, whatever the offered load (measured here at 10x). The ingress: per live
  // request at most its admission, its cancel, its deadline and its end, plus the shard list
  // and the drain. A shard: per micro-batch in flight one E2A per expert and its attention,
  // side and final completions, plus an admission and a cancel per live request and a few
  // plan/step messages. A μ-queue: one A2E per (shard, micro-batch, chunk), one done per
  // hosted expert, a few control messages. An expert: the μ-queue hands a device at most 2
  // batches per lane (thread) at a time, and each comes back as one completion.
  EngineReport report = engine.report();
  std::size_t ag = config.attention_devices, experts = std::size_t(engine.model_config().num_experts),
              mbs = config.plan.r1 * config.plan.r2;
  std::size_t ingress_bound = 4 * limit + ag + 2;
  std::size_t shard_bound = mbs * (experts + 3) + 2 * limit + 4;
  std::size_t queue_bound = ag * mbs + experts + 4;
  std::size_t expert_bound = 2 * (2 * config.threads_per_device) + 2;
  std::printf("overload 10x mailboxes, largest seen (bound from the limits): ingress %zu (%zu), shard %zu (%zu), "
              "mu_queue %zu (%zu), expert %zu (%zu)\n",
              report.mailbox_peak_ingress, ingress_bound, report.mailbox_peak_shard, shard_bound,
              report.mailbox_peak_queue, queue_bound, report.mailbox_peak_expert, expert_bound);
  CHECK(report.mailbox_peak_ingress <= ingress_bound);
  CHECK(report.mailbox_peak_shard <= shard_bound);
  CHECK(report.mailbox_peak_queue <= queue_bound);
  CHECK(report.mailbox_peak_expert <= expert_bound);
  // It was measured at all. Not by the shard and μ-queue alone: their messages are handled on
  // the device threads as the completions come (a finished expert batch sends its E2A and done
  // from its task), so they rarely find a second one waiting, and 0 is then their true peak.
  CHECK(report.mailbox_peak_ingress + report.mailbox_peak_queue + report.mailbox_peak_shard +
            report.mailbox_peak_expert >
        0);
}

TEST_CASE("max_queued_tokens refuses what would queue past it, naming the limit") {
  EngineConfig config;
  config.synthetic_config = small_model;
  config.kv_capacity_tokens = 40;  // one running request at a time: the rest queue
  config.max_queued_tokens = 25;
  auto made = Engine::create(config);
  REQUIRE(made.ok());
  Engine& engine = **made;
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (int i = 0; i < 6; ++i) {
    Request request;
    request.prompt = std::vector<std::int32_t>(10, 3 + i);
    request.max_new_tokens = 20;
    request.ignore_eos = true;
    streams.push_back(engine.submit(request));
  }
  std::size_t overloaded = 0, done = 0;
  for (auto& s : streams) {
    REQUIRE(ends_within(*s, std::chrono::seconds{30}));
    if (s->error_code() == ErrorCode::overloaded)
      ++overloaded;
    else if (s->error_code() == ErrorCode::none)
      ++done;
  }
  CHECK(overloaded >= 1);
  CHECK(overloaded + done == streams.size());
  Request too_long;  // never fits the queue
  too_long.prompt = std::vector<std::int32_t>(30, 5);
  too_long.max_new_tokens = 1;
  auto refused = engine.submit(too_long);
  REQUIRE(ends_within(*refused, std::chrono::seconds{5}));
  CHECK(refused->error_code() == ErrorCode::overloaded);
  auto out = refused->wait();
  REQUIRE_FALSE(out.ok());
  CHECK(out.err().message.find("max_queued_tokens 25") != std::string::npos);
  engine.shutdown();
}

TEST_CASE("a deadline ends a running or a queued request with deadline_exceeded") {
  EngineConfig config;
  config.synthetic_config = small_model;
  config.kv_capacity_tokens = 6000;  // the long request holds the only shard's room
  auto made = Engine::create(config);
  REQUIRE(made.ok());
  Engine& engine = **made;
  Request long_one;
  long_one.prompt = {1, 2, 3};
  long_one.max_new_tokens = 5000;  // far longer than the deadline
  long_one.ignore_eos = true;
  long_one.deadline = std::chrono::milliseconds{150};
  Request queued = long_one;
  queued.max_new_tokens = 4000;  // waits: 5003 + 4003 > 6000
  queued.deadline = std::chrono::milliseconds{50};
  auto started = clock_type::now();
  auto running = engine.submit(long_one);
  auto waiting = engine.submit(queued);
  REQUIRE(ends_within(*waiting, std::chrono::seconds{10}));
  REQUIRE(ends_within(*running, std::chrono::seconds{10}));
  double took_ms = std::chrono::duration<double, std::milli>(clock_type::now() - started).count();
  std::printf("deadline: 150 ms request ended after %.1f ms\n", took_ms);
  CHECK(waiting->error_code() == ErrorCode::deadline_exceeded);
  CHECK(running->error_code() == ErrorCode::deadline_exceeded);
  CHECK(took_ms < 5000);
  CHECK(std::string(to_string(ErrorCode::deadline_exceeded)) == "deadline_exceeded");
  engine.shutdown();
}
