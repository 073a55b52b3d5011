#pragma once

// The server's counters and histograms, written as Prometheus text exposition format 0.0.4
// (`# HELP`, `# TYPE`, samples; histograms as cumulative `_bucket{le=…}`, `_sum`, `_count`).
// Names follow vLLM's where one exists (requests running / waiting, time to first token,
// end-to-end latency, prompt and generation tokens), prefixed `moert_`.
//
// Thread safety: every member may be called from any thread at once.

#include "engine/engine.hpp"

#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace moert::server {

class histogram {
public:
  explicit histogram(std::vector<double> upper_bounds);
  void observe(double value);
  // Appends the _bucket/_sum/_count lines (HELP and TYPE too).
  void write(std::string& out, const std::string& name, const std::string& help) const;

private:
  std::vector<double> bounds_;
  mutable std::mutex mutex_;
  std::vector<std::uint64_t> counts_;  // per bucket, not cumulative; last = +Inf
  double sum_ = 0;
  std::uint64_t count_ = 0;
};

// How a request ended, as the server saw it.
enum class request_outcome { stop, length, cancelled, error, count_ };
const char* to_string(request_outcome outcome);

class server_metrics {
public:
  server_metrics();

  void add_prompt_tokens(std::size_t n) { prompt_tokens_ += n; }
  void add_generation_tokens(std::size_t n) { generation_tokens_ += n; }
  void observe_time_to_first_token(double seconds) { ttft_.observe(seconds); }
  void observe_e2e_latency(double seconds) { e2e_.observe(seconds); }
  void observe_queue_time(double seconds) { queue_.observe(seconds); }
  void request_finished(request_outcome outcome) { finished_[std::size_t(outcome)]++; }
  // The engine ended a request with finish reason `cancelled` (disconnect, stop string, shutdown).
  void engine_cancelled() { engine_cancelled_++; }
  void client_disconnected() { disconnects_++; }
  void rejected_overloaded() { overloaded_++; }
  void http_response(int status);

  // The exposition text; `load` and `report` come from the engine (absent while loading).
  std::string render(const EngineLoad* load, const EngineReport* report, std::size_t inflight,
                     std::size_t max_inflight) const;

private:
  std::atomic<std::uint64_t> prompt_tokens_{0}, generation_tokens_{0};
  std::atomic<std::uint64_t> engine_cancelled_{0}, disconnects_{0}, overloaded_{0};
  std::array<std::atomic<std::uint64_t>, std::size_t(request_outcome::count_)> finished_{};
  // HTTP responses by status class 2xx..5xx.
  std::array<std::atomic<std::uint64_t>, 4> http_{};
  histogram ttft_, e2e_, queue_;
};

// Escapes a label value (backslash, quote, newline) as the format requires.
std::string escape_label(const std::string& value);

}  // namespace moert::server
