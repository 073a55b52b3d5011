// What the HTTP server costs: throughput and time to first token at 1, 8 and 32 concurrent
// streams on the bench model (moert bench's synthetic qwen3_moe shape), through the server
// (HTTP on loopback, streamed as SSE, one client thread per stream) and through the engine
// API directly, on the same Engine. Runs alternate between the two paths; the table gives the
// median and range of throughput over the runs and TTFT percentiles pooled over them.
// Goal (issue [H]): the server costs at most 5 % of throughput at 32 streams.

#include "core/rng.hpp"
#include "engine/engine.hpp"
#include "model/config.hpp"
#include "model/weights.hpp"
#include "server/server.hpp"

#include <CLI/CLI.hpp>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

using steady = std::chrono::steady_clock;
using nlohmann::json;

struct options {
  std::size_t layers = 8, hidden = 1024, heads = 16, kv_heads = 4, head_dim = 64;
  std::size_t experts = 32, top_k = 4, expert_intermediate = 512, vocab = 4096;
  std::size_t prompt_tokens = 16, new_tokens = 32;
  std::vector<std::size_t> streams = {1, 8, 32};
  std::size_t reps = 3;
  std::size_t ag = 1, eg = 1;
};

struct run_figures {
  double tokens_per_s = 0;
  std::vector<double> ttft_ms;  // one per stream
};

double ms_between(steady::time_point a, steady::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

std::vector<std::vector<std::int32_t>> prompts_for(const options& o, std::size_t n, std::uint64_t salt) {
  moert::rng gen{salt};
  std::vector<std::vector<std::int32_t>> out(n);
  for (auto& p : out) {
    p.resize(o.prompt_tokens);
    for (auto& t : p)
      t = std::int32_t(gen.next_u64() % o.vocab);
  }
  return out;
}

run_figures run_engine(moert::Engine& engine, const options& o, std::size_t n, std::uint64_t salt) {
  auto prompts = prompts_for(o, n, salt);
  std::vector<double> ttft(n);
  std::vector<std::size_t> tokens(n);
  std::vector<std::thread> threads;
  auto start = steady::now();
  for (std::size_t i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      moert::Request r;
      r.prompt = prompts[i];
      r.max_new_tokens = o.new_tokens;
      r.ignore_eos = true;
      auto submitted = steady::now();
      auto stream = engine.submit(std::move(r));
      while (auto e = stream->next()) {
        if (e->token >= 0 && tokens[i]++ == 0)
          ttft[i] = ms_between(submitted, steady::now());
        if (!e->error.empty())
          std::fprintf(stderr, "engine: %s\n", e->error.c_str());
      }
    });
  for (auto& t : threads)
    t.join();
  double seconds = ms_between(start, steady::now()) / 1000.0;
  std::size_t total = 0;
  for (auto t : tokens)
    total += t;
  return {double(total) / seconds, ttft};
}

run_figures run_server(int port, const options& o, std::size_t n, std::uint64_t salt) {
  auto prompts = prompts_for(o, n, salt);
  std::vector<double> ttft(n);
  std::vector<std::size_t> tokens(n);
  std::vector<std::thread> threads;
  auto start = steady::now();
  for (std::size_t i = 0; i < n; ++i)
    threads.emplace_back([&, i] {
      httplib::Client c{"127.0.0.1", port};
      c.set_read_timeout(600, 0);
      json body = {{"prompt", prompts[i]}, {"max_tokens", o.new_tokens}, {"ignore_eos", true},
                   {"temperature", 0},     {"stream", true}};
      httplib::Request req;
      req.method = "POST";
      req.path = "/v1/completions";
      req.body = body.dump();
      req.set_header("Content-Type", "application/json");
      std::string pending;
      auto submitted = steady::now();
      req.content_receiver = [&](const char* data, std::size_t size, std::uint64_t, std::uint64_t) {
        pending.append(data, size);
        std::size_t end;
        while ((end = pending.find("\n\n")) != std::string::npos) {
          std::string event = pending.substr(0, end);
          pending.erase(0, end + 2);
          // Text chunks carry "finish_reason":null; the finish chunk and [DONE] do not count.
          if (event.find("\"finish_reason\":null") != std::string::npos && tokens[i]++ == 0)
            ttft[i] = ms_between(submitted, steady::now());
        }
        return true;
      };
      auto res = c.send(req);
      if (!res || res->status != 200)
        std::fprintf(stderr, "server: request %zu failed (%s) after %zu tokens, %.0f ms\n", i,
                     res ? std::to_string(res->status).c_str() : httplib::to_string(res.error()).c_str(), tokens[i],
                     ms_between(submitted, steady::now()));
    });
  for (auto& t : threads)
    t.join();
  double seconds = ms_between(start, steady::now()) / 1000.0;
  std::size_t total = 0;
  for (auto t : tokens)
    total += t;
  return {double(total) / seconds, ttft};
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  if (v.empty())
    return 0;
  std::size_t idx = std::min(v.size() - 1, std::size_t(q * double(v.size() - 1) + 0.5));
  return v[idx];
}

struct summary {
  double median = 0, low = 0, high = 0, ttft_p50 = 0, ttft_p99 = 0;
};

summary summarize(const std::vector<run_figures>& runs) {
  std::vector<double> tps, ttft;
  for (const auto& r : runs) {
    tps.push_back(r.tokens_per_s);
    ttft.insert(ttft.end(), r.ttft_ms.begin(), r.ttft_ms.end());
  }
  std::sort(tps.begin(), tps.end());
  return {tps[tps.size() / 2], tps.front(), tps.back(), percentile(ttft, 0.5), percentile(ttft, 0.99)};
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  CLI::App app{"moert serve bench: the HTTP server against the engine API, same engine"};
  app.add_option("--layers", o.layers);
  app.add_option("--hidden", o.hidden);
  app.add_option("--experts", o.experts);
  app.add_option("--top-k", o.top_k);
  app.add_option("--expert-intermediate", o.expert_intermediate);
  app.add_option("--prompt-tokens", o.prompt_tokens)->check(CLI::Range(1, 1 << 16));
  app.add_option("--new-tokens", o.new_tokens, "Tokens generated per stream")->check(CLI::Range(1, 1 << 16));
  app.add_option("--streams", o.streams, "Concurrent streams, e.g. --streams 1 8 32");
  app.add_option("--reps", o.reps, "Runs per figure and path")->check(CLI::Range(1, 100));
  app.add_option("--ag", o.ag, "Attention devices")->check(CLI::Range(1, 64));
  app.add_option("--eg", o.eg, "Expert devices")->check(CLI::Range(1, 64));
  CLI11_PARSE(app, argc, argv);

  json c = {{"model_type", "qwen3_moe"},      {"vocab_size", o.vocab},
            {"hidden_size", o.hidden},        {"num_hidden_layers", o.layers},
            {"num_attention_heads", o.heads}, {"num_key_value_heads", o.kv_heads},
            {"head_dim", o.head_dim},         {"num_experts", o.experts},
            {"num_experts_per_tok", o.top_k}, {"moe_intermediate_size", o.expert_intermediate},
            {"norm_topk_prob", true}};
  auto config = moert::model::parse_config(c.dump(), "bench model");
  if (!config) {
    std::fprintf(stderr, "moert: error: %s\n", config.err().what().c_str());
    return 1;
  }
  std::size_t max_streams = *std::max_element(o.streams.begin(), o.streams.end());
  moert::EngineConfig e;
  e.weights = std::make_shared<const moert::model::model_weights>(moert::model::synthetic_weights(*config, 1));
  e.weights_config = *config;
  e.attention_devices = o.ag;
  e.expert_devices = o.eg;
  e.actor_threads = 1;
  e.defrag.max_wait = std::chrono::nanoseconds{0};
  auto created = moert::Engine::create(e);
  if (!created) {
    std::fprintf(stderr, "moert: error: %s\n", created.err().what().c_str());
    return 1;
  }
  std::shared_ptr<moert::Engine> engine{std::move(created.value())};

  moert::server::server_options so;
  so.port = 0;
  so.model_name = "bench";
  so.max_inflight = max_streams;
  moert::server::http_server http{so};
  auto port = http.bind();
  if (!port) {
    std::fprintf(stderr, "moert: error: %s\n", port.err().what().c_str());
    return 1;
  }
  http.start();
  http.attach(engine, nullptr);

  std::printf("# moert serve bench: %zu layers, hidden %zu, %zu experts top-%zu, expert intermediate %zu, vocab %zu "
              "(synthetic qwen3_moe, f32); %zu attention + %zu expert devices\n",
              o.layers, o.hidden, o.experts, o.top_k, o.expert_intermediate, o.vocab, o.ag, o.eg);
  std::printf("# each stream: %zu prompt tokens, %zu generated (greedy, ignore_eos); %zu runs per figure, paths "
              "alternating; server = HTTP on 127.0.0.1, SSE, one client thread per stream; %u hardware threads\n",
              o.prompt_tokens, o.new_tokens, o.reps, std::thread::hardware_concurrency());
  std::string streams_arg;
  for (auto s : o.streams)
    streams_arg += " " + std::to_string(s);
  std::printf("# reproduce: moert_bench_serve --layers %zu --hidden %zu --experts %zu --top-k %zu --prompt-tokens %zu "
              "--new-tokens %zu --streams%s --reps %zu --ag %zu --eg %zu\n",
              o.layers, o.hidden, o.experts, o.top_k, o.prompt_tokens, o.new_tokens, streams_arg.c_str(), o.reps, o.ag,
              o.eg);

  // Warm-up: first-touch of weights and KV pages, thread start-up.
  run_engine(*engine, o, 2, 99);
  run_server(*port, o, 2, 98);

  std::printf("| streams | path       | tokens/s median (min-max)  | TTFT p50 ms | TTFT p99 ms | server cost |\n");
  std::printf("|---------|------------|----------------------------|-------------|-------------|-------------|\n");
  for (std::size_t n : o.streams) {
    std::vector<run_figures> direct, served;
    for (std::size_t r = 0; r < o.reps; ++r) {
      // Same prompts in both paths of a rep; the order alternates so drift hits both.
      std::uint64_t salt = 1000 * n + r;
      if (r % 2 == 0) {
        direct.push_back(run_engine(*engine, o, n, salt));
        served.push_back(run_server(*port, o, n, salt));
      } else {
        served.push_back(run_server(*port, o, n, salt));
        direct.push_back(run_engine(*engine, o, n, salt));
      }
    }
    summary d = summarize(direct), s = summarize(served);
    std::printf("| %7zu | engine API | %8.1f (%7.1f-%8.1f) | %11.1f | %11.1f |             |\n", n, d.median, d.low,
                d.high, d.ttft_p50, d.ttft_p99);
    std::printf("| %7zu | HTTP (SSE) | %8.1f (%7.1f-%8.1f) | %11.1f | %11.1f | %+10.1f%% |\n", n, s.median, s.low,
                s.high, s.ttft_p50, s.ttft_p99, 100.0 * (d.median - s.median) / d.median);
    std::fflush(stdout);
  }
  std::printf("server cost = throughput lost through HTTP vs the engine API (goal: <= 5 %% at 32 streams)\n");
  std::string m = http.metrics().render(nullptr, nullptr, 0, 0);
  for (const char* name : {"moert_client_disconnects_total", "moert_requests_rejected_overloaded_total"})
    if (auto at = m.find(std::string{"\n"} + name + " "); at != std::string::npos)
      std::printf("%s\n", m.substr(at + 1, m.find('\n', at + 1) - at - 1).c_str());
  http.stop();
  engine->shutdown();
  return 0;
}
