#include "server/metrics.hpp"

#include <cmath>
#include <cstdio>

namespace moert::server {

namespace {

std::string number(double v) {
  if (std::isinf(v))
    return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v))
    return "NaN";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

void header(std::string& out, const std::string& name, const char* type, const std::string& help) {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
}

void sample(std::string& out, const std::string& name, double value, const std::string& labels = {}) {
  out += name;
  if (!labels.empty())
    out += "{" + labels + "}";
  out += " " + number(value) + "\n";
}

void scalar(std::string& out, const std::string& name, const char* type, const std::string& help, double value) {
  header(out, name, type, help);
  sample(out, name, value);
}

// Seconds: 1 ms .. 2 min, roughly ×2.5 per bucket (vLLM's TTFT buckets are similar).
std::vector<double> latency_buckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
          2.5,   5.0,    7.5,   10.0, 20.0, 40.0, 80.0, 160.0};
}

}  // namespace

std::string escape_label(const std::string& value) {
  std::string out;
  for (char c : value) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

histogram::histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)), counts_(bounds_.size() + 1, 0) {}

void histogram::observe(double value) {
  std::size_t bucket = 0;
  while (bucket < bounds_.size() && value > bounds_[bucket])
    ++bucket;
  std::lock_guard lock{mutex_};
  ++counts_[bucket];
  sum_ += value;
  ++count_;
}

void histogram::write(std::string& out, const std::string& name, const std::string& help) const {
  std::lock_guard lock{mutex_};
  header(out, name, "histogram", help);
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i <= bounds_.size(); ++i) {
    cumulative += counts_[i];
    sample(out, name + "_bucket", double(cumulative),
           "le=\"" + (i < bounds_.size() ? number(bounds_[i]) : std::string{"+Inf"}) + "\"");
  }
  sample(out, name + "_sum", sum_);
  sample(out, name + "_count", double(count_));
}

const char* to_string(request_outcome outcome) {
  switch (outcome) {
    case request_outcome::stop: return "stop";
    case request_outcome::length: return "length";
    case request_outcome::cancelled: return "cancelled";
    case request_outcome::error: return "error";
    case request_outcome::count_: break;
  }
  return "?";
}

server_metrics::server_metrics() : ttft_(latency_buckets()), e2e_(latency_buckets()), queue_(latency_buckets()) {}

void server_metrics::http_response(int status) {
  if (status >= 200 && status < 600)
    http_[std::size_t(status / 100 - 2)]++;
}

std::string server_metrics::render(const EngineLoad* load, const EngineReport* report, std::size_t inflight,
                                   std::size_t max_inflight) const {
  std::string out;
  scalar(out, "moert_model_loaded", "gauge", "1 once the model is loaded and requests are served.",
         load ? 1.0 : 0.0);
  scalar(out, "moert_num_requests_running", "gauge", "Requests admitted to an attention shard, generating.",
         load ? double(load->running) : 0.0);
  scalar(out, "moert_num_requests_waiting", "gauge", "Requests accepted by the engine, waiting for admission.",
         load ? double(load->waiting) : 0.0);
  scalar(out, "moert_server_requests_in_flight", "gauge", "Generation requests the server holds now.",
         double(inflight));
  scalar(out, "moert_server_max_requests_in_flight", "gauge",
         "The in-flight limit; beyond it requests are answered 429 at once.", double(max_inflight));
  scalar(out, "moert_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.",
         double(prompt_tokens_.load()));
  scalar(out, "moert_generation_tokens_total", "counter", "Tokens generated.", double(generation_tokens_.load()));
  header(out, "moert_request_finished_total", "counter", "Finished generation requests by how they ended.");
  for (std::size_t i = 0; i < finished_.size(); ++i)
    sample(out, "moert_request_finished_total", double(finished_[i].load()),
           std::string{"finished_reason=\""} + to_string(request_outcome(i)) + "\"");
  scalar(out, "moert_engine_requests_cancelled_total", "counter",
         "Requests the engine ended as cancelled (client gone, stop string, shutdown).",
         double(engine_cancelled_.load()));
  scalar(out, "moert_client_disconnects_total", "counter", "Clients that went away before their request ended.",
         double(disconnects_.load()));
  scalar(out, "moert_requests_rejected_overloaded_total", "counter",
         "Requests refused with 429 because the in-flight limit was reached.", double(overloaded_.load()));
  header(out, "moert_http_responses_total", "counter", "HTTP responses by status class.");
  for (std::size_t i = 0; i < http_.size(); ++i)
    sample(out, "moert_http_responses_total", double(http_[i].load()),
           "code=\"" + std::to_string(i + 2) + "xx\"");
  ttft_.write(out, "moert_time_to_first_token_seconds", "Time from receiving a request to its first token.");
  e2e_.write(out, "moert_e2e_request_latency_seconds", "Time from receiving a request to its last token.");
  queue_.write(out, "moert_request_queue_time_seconds", "Engine queue wait: submit to admission (engine timings).");
  if (report) {
    scalar(out, "moert_expert_batch_size_mean", "gauge", "Mean tokens per expert execution.",
           report->expert_batch_mean);
    scalar(out, "moert_expert_batch_size_p50", "gauge", "Median tokens per expert execution.",
           report->expert_batch_p50);
    scalar(out, "moert_expert_batch_size_p95", "gauge", "95th percentile of tokens per expert execution.",
           report->expert_batch_p95);
    scalar(out, "moert_expert_executions_per_layer_wave", "gauge",
           "Fragmentation: expert runs per (layer, wave).", report->executions_per_layer_wave);
    scalar(out, "moert_engine_tokens_total", "counter", "Tokens the engine has produced.", double(report->tokens));
    scalar(out, "moert_replans_total", "counter", "Online FinDEP re-solves.", double(report->replans));
    header(out, "moert_engine_requests_finished_total", "counter",
           "Requests the engine ended, by how (its own count; rejected ones are errors).");
    sample(out, "moert_engine_requests_finished_total", double(report->finished_length), "reason=\"length\"");
    sample(out, "moert_engine_requests_finished_total", double(report->finished_stop), "reason=\"stop\"");
    sample(out, "moert_engine_requests_finished_total", double(report->cancelled), "reason=\"cancelled\"");
    sample(out, "moert_engine_requests_finished_total", double(report->errors), "reason=\"error\"");
    header(out, "moert_device_busy_ratio", "gauge", "Busy time of each device over the engine's lifetime.");
    for (const auto& d : report->devices)
      sample(out, "moert_device_busy_ratio", d.busy_fraction, "device=\"" + escape_label(d.name) + "\"");
  }
  return out;
}

}  // namespace moert::server
