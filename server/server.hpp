#pragma once

// moert's OpenAI-compatible HTTP front end on cpp-httplib 0.11:
//   POST /v1/completions, POST /v1/chat/completions (JSON, or server-sent events with
//   "stream": true), GET /v1/models, GET /health (503 until attach(), 200 after),
//   GET /metrics (Prometheus text).
// It listens before the model is loaded (so /health can say "loading"), bounds its worker
// pool and the requests in flight (beyond the limit: 429 with Retry-After at once), limits
// body size (413), cancels a request whose client disconnects (streamed or not), cuts stop
// strings, and keys a seeded request's sampling by its seed alone, so the same seed gives the
// same text whatever else is running.
//
// Lifecycle: bind() → start() → attach(engine, tokenizer) … stop(). stop() ends open streams
// (their requests are cancelled) and waits for the workers; the engine's own shutdown comes
// after, by its owner.
//
// Thread safety: bind/start/attach/stop from one controlling thread; handlers run on the
// server's worker pool.

#include "core/error.hpp"
#include "engine/engine.hpp"
#include "server/metrics.hpp"
#include "tokenizer/tokenizer.hpp"

#include <cstdint>
#include <memory>
#include <string>

namespace moert::server {

struct server_options {
  std::string host = "127.0.0.1";
  int port = 8080;          // 0: any free port (bind() tells which)
  std::string api_key;      // non-empty: /v1/* needs "Authorization: Bearer <key>"
  std::string model_name = "moert";
  std::size_t max_inflight = 64;     // generation requests at once; beyond: 429
  std::size_t http_threads = 0;      // workers; 0: max_inflight + 16 (health, metrics, 429s)
  std::size_t max_body_bytes = 1 << 20;
  int read_timeout_s = 30;
  int write_timeout_s = 30;
  // An idle keep-alive connection holds a worker this long. httplib 0.11 also waits at most
  // this long for a new connection's first request (a client starved of CPU between connect
  // and send was dropped at 2 s under load), so it stays at httplib's default.
  int keep_alive_timeout_s = 5;
  double request_timeout_s = 600;     // a request still running after this is cancelled
  std::size_t default_max_tokens = 16;  // /v1/completions without max_tokens (as OpenAI)
};

// True for 127.0.0.0/8, ::1 and "localhost".
bool is_loopback_host(const std::string& host);

class http_server {
public:
  explicit http_server(server_options options);
  ~http_server();

  http_server(const http_server&) = delete;
  http_server& operator=(const http_server&) = delete;

  // Binds host:port. Refuses a non-loopback host without an API key. Returns the port.
  result<int> bind();
  // Serves on a background thread.
  void start();
  // The model is ready: generation requests are served from now on. `tok` may be null: then
  // prompts must be token ids and text comes back as space-separated ids; chat is refused.
  void attach(std::shared_ptr<Engine> engine, std::shared_ptr<const tokenizer::tokenizer> tok);
  // Ends open streams (cancelling their requests), stops listening, joins the workers.
  void stop();

  int port() const;
  const server_metrics& metrics() const;

  struct impl;

private:
  std::unique_ptr<impl> impl_;
};

}  // namespace moert::server
