#include "server/server.hpp"

#include "core/rng.hpp"
#include "server/connection_watch.hpp"
#include "server/openai_protocol.hpp"
#include "server/text_stream.hpp"

#include <httplib.h>

#include <arpa/inet.h>
#include <sys/socket.h>
#include <csignal>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>

namespace moert::server {

namespace {

using steady = std::chrono::steady_clock;
using nlohmann::json;

// How often a waiting handler looks at its socket, the shutdown flag and its deadline.
constexpr std::chrono::milliseconds poll_interval{25};
// How long a handler waits for the engine to acknowledge a cancel before giving up on it.
constexpr std::chrono::seconds cancel_grace{10};

std::string dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

double seconds_since(steady::time_point t) {
  return std::chrono::duration<double>(steady::now() - t).count();
}

// Constant-time comparison: a key check must not leak how much of the key matched.
bool same_secret(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (std::size_t i = 0; i < a.size(); ++i)
    diff |= static_cast<unsigned char>(a[i] ^ (i < b.size() ? b[i] : 0));
  return diff == 0;
}

api_error engine_error(const TokenEvent& e) {
  std::string message = e.error.empty() ? std::string{"request failed: "} + to_string(e.error_code) : e.error;
  switch (e.error_code) {
    case ErrorCode::invalid_request: return {400, message, "invalid_request_error", "", ""};
    case ErrorCode::context_too_long: return {400, message, "invalid_request_error", "", "context_length_exceeded"};
    case ErrorCode::overloaded: return {429, message, "server_overloaded", "", "overloaded"};
    case ErrorCode::shutdown: return {503, message, "server_error", "", "shutdown"};
    case ErrorCode::deadline_exceeded: return {504, message, "server_error", "", "deadline_exceeded"};
    case ErrorCode::internal:
    case ErrorCode::none: break;
  }
  return {500, message, "server_error", "", "internal_error"};
}

// Counters shared by the server and the engine callbacks (which may run after a handler is gone).
struct shared_state {
  std::atomic<std::size_t> inflight{0};
  server_metrics metrics;
};

// One request's place under the in-flight limit; given back once, when the engine ends the
// request (its last event) or when nothing refers to it any more.
class inflight_slot {
public:
  explicit inflight_slot(std::shared_ptr<shared_state> state) : state_(std::move(state)) {}
  ~inflight_slot() { release(); }
  void release() {
    if (!released_.exchange(true))
      state_->inflight--;
  }

private:
  std::shared_ptr<shared_state> state_;
  std::atomic<bool> released_{false};
};

// The events of one request: pushed by the engine's callback, popped by its handler.
struct event_channel {
  std::mutex mutex;
  std::condition_variable changed;
  std::deque<TokenEvent> events;

  void push(const TokenEvent& e) {
    {
      std::lock_guard lock{mutex};
      events.push_back(e);
    }
    changed.notify_one();
  }
  std::optional<TokenEvent> pop_for(std::chrono::milliseconds wait) {
    std::unique_lock lock{mutex};
    if (!changed.wait_for(lock, wait, [&] { return !events.empty(); }))
      return std::nullopt;
    TokenEvent e = std::move(events.front());
    events.pop_front();
    return e;
  }
  // An event already queued that ends the request with an error (a refusal at submit).
  std::optional<TokenEvent> immediate_error() {
    std::lock_guard lock{mutex};
    if (events.size() == 1 && events.front().last && events.front().token < 0 &&
        events.front().error_code != ErrorCode::none)
      return events.front();
    return std::nullopt;
  }
};

}  // namespace

bool is_loopback_host(const std::string& host) {
  if (host == "localhost" || host == "::1" || host == "[::1]")
    return true;
  in_addr addr{};
  return inet_pton(AF_INET, host.c_str(), &addr) == 1 && (ntohl(addr.s_addr) >> 24) == 127;
}

// -- impl ---------------------------------------------------------------------

struct http_server::impl {
  server_options opt;
  httplib::Server svr;
  std::thread listener;
  int port = -1;
  int listen_fd = -1;  // seen by the socket-options hook, to raise httplib's backlog
  std::shared_ptr<shared_state> state = std::make_shared<shared_state>();
  std::atomic<bool> ready{false};
  std::atomic<bool> shutting_down{false};
  std::shared_ptr<Engine> engine;
  std::shared_ptr<const tokenizer::tokenizer> tok;
  std::size_t vocab = 0, max_context = 0;
  std::set<std::int32_t> stop_ids;         // EOS of the model and the tokenizer
  std::vector<std::int32_t> extra_stop_ids;  // the tokenizer's EOS when the model's differs
  std::atomic<std::uint64_t> next_request_id{1};
  std::uint64_t unseeded_base = std::random_device{}();
  std::int64_t created = std::chrono::duration_cast<std::chrono::seconds>(
                             std::chrono::system_clock::now().time_since_epoch())
                             .count();

  explicit impl(server_options o) : opt(std::move(o)) {}

  void routes();
  void reply_error(httplib::Response& res, const api_error& err);
  bool authorized(const httplib::Request& req, httplib::Response& res);
  void generate(endpoint kind, const httplib::Request& req, httplib::Response& res,
                const httplib::ContentReader& reader);
};

void http_server::impl::reply_error(httplib::Response& res, const api_error& err) {
  res.status = err.status;
  if (err.status == 429 || err.status == 503)
    res.set_header("Retry-After", "1");
  res.set_content(dump(to_json(err)), "application/json");
}

bool http_server::impl::authorized(const httplib::Request& req, httplib::Response& res) {
  if (opt.api_key.empty())
    return true;
  const std::string header = req.get_header_value("Authorization");
  const std::string prefix = "Bearer ";
  if (header.size() > prefix.size() && header.compare(0, prefix.size(), prefix) == 0 &&
      same_secret(header.substr(prefix.size()), opt.api_key))
    return true;
  res.set_header("WWW-Authenticate", "Bearer");
  reply_error(res, {401,
                    header.empty() ? "missing API key: send 'Authorization: Bearer <key>'"
                                   : "incorrect API key provided",
                    "invalid_request_error", "", "invalid_api_key"});
  return false;
}

// -- one generation request -----------------------------------------------------

namespace {

struct generation_outcome {
  const char* finish_reason = nullptr;  // "stop" or "length" when it ended normally
  std::optional<api_error> error;
  bool disconnected = false;
  std::size_t completion_tokens = 0;
};

// What a handler keeps of one request while it runs (also inside a stream's content provider).
struct request_context {
  http_server::impl* server = nullptr;
  std::shared_ptr<Engine> engine;
  std::shared_ptr<event_channel> channel;
  std::uint64_t id = 0;
  endpoint kind = endpoint::completions;
  response_meta meta;
  generation_request params;
  std::size_t prompt_tokens = 0;
  steady::time_point received;
  std::unique_ptr<text_stream> text;
  connection_watch watch;
  std::size_t logprob_offset = 0;  // completions' text_offset of the next token
  bool finished = false;

  request_context(const std::string& addr, int remote_port, int local_port) : watch(addr, remote_port, local_port) {}
  ~request_context() { abandon(); }

  // The request will not be read on: let the engine stop working on it.
  void abandon() {
    if (!finished && engine)
      engine->cancel(id);
    finished = true;
  }

  token_logprob logprob_of(const TokenEvent& e) const {
    token_logprob out{text->token_text(e.token), e.logprob, {}};
    for (const TopLogprob& t : e.top_logprobs)
      out.top.emplace_back(text->token_text(t.token), t.logprob);
    return out;
  }

  json logprobs_of(const std::vector<token_logprob>& lps) {
    if (!params.logprobs)
      return nullptr;
    json out = logprobs_json(kind, lps, logprob_offset);
    for (const auto& t : lps)
      logprob_offset += t.token.size();
    return out;
  }

  // Runs the request to its end, handing text as it becomes final to `deliver` (false: the
  // client is gone). Watches the socket, the server's shutdown and the request's deadline.
  template <class Deliver>
  generation_outcome run(Deliver&& deliver) {
    generation_outcome out;
    server_metrics& metrics = server->state->metrics;
    auto deadline = received + std::chrono::duration_cast<steady::duration>(
                                   std::chrono::duration<double>(server->opt.request_timeout_s));
    std::vector<token_logprob> lps;
    auto stop_early = [&](generation_outcome& o) {
      engine->cancel(id);
      finished = true;
      return o;
    };
    steady::time_point next_check = steady::now() + poll_interval;
    for (;;) {
      std::optional<TokenEvent> e = channel->pop_for(poll_interval);
      // Between events, and at most every poll_interval while tokens stream in (a token may
      // come faster than the interval, so a timeout alone would never see the flags).
      if (!e || steady::now() >= next_check) {
        next_check = steady::now() + poll_interval;
        if (server->shutting_down) {
          out.error = api_error{503, "the server is shutting down", "server_error", "", "shutdown"};
          return stop_early(out);
        }
        if (watch.peer_gone()) {
          out.disconnected = true;
          metrics.client_disconnected();
          return stop_early(out);
        }
        if (steady::now() > deadline) {
          out.error = api_error{504, "the request ran longer than the server's request timeout", "server_error", "",
                                "timeout"};
          return stop_early(out);
        }
        if (!e)
          continue;
      }
      std::string delta;
      if (e->token >= 0) {
        if (++out.completion_tokens == 1)
          metrics.observe_time_to_first_token(seconds_since(received));
        bool stop_token = e->last && e->finish_reason == FinishReason::stop && server->stop_ids.count(e->token);
        if (!stop_token) {
          delta = text->push(e->token);
          if (params.logprobs)
            lps.push_back(logprob_of(*e));
        }
        if (text->stopped()) {  // a stop string: the text ends before it, the engine stops
          out.finish_reason = "stop";
          if (!e->last)
            engine->cancel(id);
          finished = true;
          deliver(delta, lps);
          return out;
        }
      }
      if (e->last) {
        finished = true;
        delta += text->finish();
        if (e->error_code != ErrorCode::none || (e->token < 0 && !e->error.empty() &&
                                                 e->finish_reason != FinishReason::cancelled)) {
          out.error = engine_error(*e);
          return out;
        }
        if (e->finish_reason == FinishReason::cancelled) {  // not by us: we return before
          out.error = api_error{500, "the engine cancelled the request", "server_error", "", "cancelled"};
          return out;
        }
        out.finish_reason = e->finish_reason == FinishReason::length ? "length" : "stop";
        if (!deliver(delta, lps))
          out.disconnected = true;
        return out;
      }
      if ((!delta.empty() || !lps.empty()) && !deliver(delta, lps)) {
        out.disconnected = true;
        metrics.client_disconnected();
        return stop_early(out);
      }
    }
  }

  void account(const generation_outcome& o) {
    server_metrics& metrics = server->state->metrics;
    if (o.disconnected)
      metrics.request_finished(request_outcome::cancelled);
    else if (o.error)
      metrics.request_finished(request_outcome::error);
    else
      metrics.request_finished(std::string{o.finish_reason} == "length" ? request_outcome::length
                                                                         : request_outcome::stop);
    if (!o.disconnected)
      metrics.observe_e2e_latency(seconds_since(received));
  }

  // The whole answer as one JSON object (status 200, or the error's).
  void respond(httplib::Response& res) {
    std::string all;
    std::vector<token_logprob> all_lps;
    generation_outcome o = run([&](const std::string& delta, std::vector<token_logprob>& lps) {
      all += delta;
      all_lps.insert(all_lps.end(), std::make_move_iterator(lps.begin()), std::make_move_iterator(lps.end()));
      lps.clear();
      return true;
    });
    account(o);
    if (o.error)
      return server->reply_error(res, *o.error);
    if (o.disconnected) {  // nobody reads this
      res.status = 499;
      return;
    }
    res.set_content(dump(completion_response(meta, all, o.finish_reason, {prompt_tokens, o.completion_tokens},
                                             logprobs_of(all_lps))),
                    "application/json");
  }

  // Server-sent events: chunks as text becomes final, the finish chunk, usage, [DONE].
  bool stream(httplib::DataSink& sink) {
    auto send = [&](const json& payload) {
      std::string event = sse_event(payload);
      return sink.write(event.data(), event.size());
    };
    bool first = kind == endpoint::chat;
    if (first && !send(stream_chunk(meta, "", true, nullptr, nullptr, params.include_usage))) {
      abandon();
      return false;
    }
    bool writable = true;
    generation_outcome o = run([&](const std::string& delta, std::vector<token_logprob>& lps) {
      if (delta.empty() && lps.empty())
        return writable;
      writable = send(stream_chunk(meta, delta, false, nullptr, logprobs_of(lps), params.include_usage));
      lps.clear();
      return writable;
    });
    account(o);
    if (o.disconnected || !writable)
      return false;
    bool ok = o.error ? send(to_json(*o.error))
                      : send(stream_chunk(meta, "", false, o.finish_reason, nullptr, params.include_usage));
    if (ok && params.include_usage && !o.error)
      ok = send(usage_chunk(meta, {prompt_tokens, o.completion_tokens}));
    if (ok)
      ok = sink.write(sse_done.data(), sse_done.size());
    if (ok)
      sink.done();
    return ok;
  }
};

}  // namespace

void http_server::impl::generate(endpoint kind, const httplib::Request& req, httplib::Response& res,
                                 const httplib::ContentReader& reader) {
  steady::time_point received = steady::now();
  // The body first, bounded, even for a request refused below: a body left unread would be
  // parsed as the next request on this keep-alive connection. A Content-Length above the limit
  // is refused by httplib without buffering (status 413 on res); a chunked body is cut here.
  std::string body;
  bool too_big = false;
  bool read = reader([&](const char* data, std::size_t size) {
    if (body.size() + size > opt.max_body_bytes) {
      too_big = true;
      return false;
    }
    body.append(data, size);
    return true;
  });
  if (too_big || res.status == 413) {
    res.set_header("Connection", "close");
    return reply_error(res, {413, "the request body exceeds " + std::to_string(opt.max_body_bytes) + " bytes",
                             "invalid_request_error", "", "payload_too_large"});
  }
  if (!read)
    return reply_error(res, {400, "could not read the request body", "invalid_request_error", "", ""});
  if (!authorized(req, res))
    return;
  if (shutting_down)
    return reply_error(res, {503, "the server is shutting down", "server_error", "", "shutdown"});
  if (!ready)
    return reply_error(res, {503, "the model is still loading", "server_error", "", "model_loading"});

  generation_request params;
  if (auto err = parse_request(kind, body, params))
    return reply_error(res, *err);
  if (!params.model.empty() && params.model != opt.model_name)
    return reply_error(res, {404, "the model '" + params.model + "' does not exist; this server serves '" +
                                      opt.model_name + "'",
                             "invalid_request_error", "model", "model_not_found"});

  // Tokens of the prompt.
  const char* prompt_param = kind == endpoint::chat ? "messages" : "prompt";
  std::vector<std::int32_t> prompt;
  if (kind == endpoint::chat) {
    if (!tok)
      return reply_error(res, bad_param("messages", "chat needs a tokenizer: start moert serve with --tokenizer DIR "
                                                    "(or a --model checkpoint that has tokenizer.json)"));
    auto rendered = tok->apply_chat_template(params.messages, params.add_generation_prompt);
    if (!rendered)
      return reply_error(res, bad_param("messages", "chat template: " + rendered.err().message));
    prompt = tok->encode(*rendered, false);
  } else if (params.prompt_text) {
    if (!tok)
      return reply_error(res, bad_param("prompt", "this server has no tokenizer (start moert serve with "
                                                  "--tokenizer DIR): send 'prompt' as a list of token ids"));
    prompt = tok->encode(*params.prompt_text, true);
  } else {
    prompt = std::move(params.prompt_ids);
  }
  if (prompt.empty())
    return reply_error(res, bad_param(prompt_param, std::string{"the "} + prompt_param + " has no tokens"));
  for (std::size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] < 0 || std::size_t(prompt[i]) >= vocab)
      return reply_error(
          res, bad_param(prompt_param, "token id " + std::to_string(prompt[i]) + " at position " + std::to_string(i) +
                                           " is outside the model's vocabulary [0, " + std::to_string(vocab) + ")" +
                                           (tok ? " (the tokenizer has " + std::to_string(tok->vocab_size()) +
                                                      " tokens, more than the model)"
                                                : std::string{})));
  std::size_t room = prompt.size() < max_context ? max_context - prompt.size() : 0;
  std::size_t max_tokens = params.max_tokens.value_or(
      kind == endpoint::chat ? room : std::min(room, opt.default_max_tokens));
  if (room == 0 || max_tokens > room)
    return reply_error(res, bad_param(params.max_tokens ? "max_tokens" : prompt_param,
                                      "this model's maximum context length is " + std::to_string(max_context) +
                                          " tokens; the request asks for " +
                                          std::to_string(prompt.size() + std::max<std::size_t>(max_tokens, 1)) +
                                          " (" + std::to_string(prompt.size()) + " in the " + prompt_param + ", " +
                                          std::to_string(std::max<std::size_t>(max_tokens, 1)) +
                                          " in the completion)",
                                      "context_length_exceeded"));

  // Admission: a place under the in-flight limit, or 429 now.
  if (state->inflight.fetch_add(1) >= opt.max_inflight) {
    state->inflight--;
    state->metrics.rejected_overloaded();
    return reply_error(res, {429,
                             "the server is at its limit of " + std::to_string(opt.max_inflight) +
                                 " requests in flight; retry later",
                             "server_overloaded", "", "overloaded"});
  }
  auto slot = std::make_shared<inflight_slot>(state);
  auto ctx = std::make_shared<request_context>(req.remote_addr, req.remote_port, port);
  ctx->server = this;
  ctx->engine = engine;
  ctx->channel = std::make_shared<event_channel>();
  ctx->id = next_request_id++;
  ctx->kind = kind;
  ctx->meta = {kind, (kind == endpoint::chat ? "chatcmpl-" : "cmpl-") + std::to_string(created) + "-" +
                         std::to_string(ctx->id),
               std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
                   .count(),
               opt.model_name};
  ctx->prompt_tokens = prompt.size();
  ctx->received = received;
  ctx->text = std::make_unique<text_stream>(tok ? make_tokenizer_detokenizer(tok) : make_id_detokenizer(),
                                            params.stop);

  Request request;
  request.id = ctx->id;
  request.prompt = std::move(prompt);
  request.max_new_tokens = max_tokens;
  request.sampling.temperature = params.temperature;
  request.sampling.top_p = params.top_p;
  request.sampling.top_k = params.top_k;
  // The engine keys draws by (seed, request id, position) and ids follow arrival order; a
  // seeded request gets the seed that makes its draws those of stream 0 under the client's
  // seed, so its text depends on the seed alone.
  request.sampling.seed = params.seed ? rekey_seed(std::uint64_t(*params.seed), 0, ctx->id)
                                      : mix64(unseeded_base ^ ctx->id);
  request.logprobs = params.logprobs;
  request.top_logprobs = params.top_logprobs;
  request.ignore_eos = params.ignore_eos;
  if (!params.ignore_eos)
    request.stop_token_ids = extra_stop_ids;
  ctx->params = std::move(params);
  state->metrics.add_prompt_tokens(ctx->prompt_tokens);

  auto channel = ctx->channel;
  auto shared = state;
  engine->submit(std::move(request), [channel, slot, shared](const TokenEvent& e) {
    if (e.token >= 0)
      shared->metrics.add_generation_tokens(1);
    if (e.last) {
      if (e.finish_reason == FinishReason::cancelled)
        shared->metrics.engine_cancelled();
      if (e.error_code == ErrorCode::none)
        shared->metrics.observe_queue_time(e.timings.queue_wait_ms / 1000.0);
    }
    channel->push(e);
    if (e.last)
      slot->release();
  });
  if (auto refused = ctx->channel->immediate_error()) {
    ctx->finished = true;
    ctx->account({nullptr, engine_error(*refused), false, 0});
    return reply_error(res, engine_error(*refused));
  }

  if (!ctx->params.stream)
    return ctx->respond(res);
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  res.set_chunked_content_provider(
      "text/event-stream", [ctx](std::size_t, httplib::DataSink& sink) { return ctx->stream(sink); },
      [ctx](bool) { ctx->abandon(); });
}

void http_server::impl::routes() {
  svr.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res,
                                     const httplib::ContentReader& reader) {
    generate(endpoint::completions, req, res, reader);
  });
  svr.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res,
                                          const httplib::ContentReader& reader) {
    generate(endpoint::chat, req, res, reader);
  });
  svr.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res))
      return;
    res.set_content(dump(models_response(opt.model_name, created, max_context)), "application/json");
  });
  svr.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    const char* status = shutting_down ? "shutting down" : ready ? "ok" : "loading";
    res.status = ready && !shutting_down ? 200 : 503;
    res.set_content(dump({{"status", status}}), "application/json");
  });
  svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    std::optional<EngineLoad> load;
    std::optional<EngineReport> report;
    if (ready) {
      load = engine->load();
      report = engine->report();
    }
    res.set_content(state->metrics.render(load ? &*load : nullptr, report ? &*report : nullptr,
                                          state->inflight.load(), opt.max_inflight),
                    "text/plain; version=0.0.4; charset=utf-8");
  });
  // Unknown routes and httplib's own refusals (413 above the Content-Length limit, 400 on a
  // malformed request line) get an OpenAI-style body too.
  svr.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty())
      return;
    if (res.status == 404)
      reply_error(res, {404, "no route " + req.method + " " + req.path, "invalid_request_error", "", "not_found"});
    else if (res.status == 413)
      reply_error(res, {413, "the request body exceeds " + std::to_string(opt.max_body_bytes) + " bytes",
                        "invalid_request_error", "", "payload_too_large"});
    else
      reply_error(res, {res.status, "HTTP error " + std::to_string(res.status),
                        res.status >= 500 ? "server_error" : "invalid_request_error", "", ""});
  });
  svr.set_exception_handler([this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "internal error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    reply_error(res, {500, what, "server_error", "", "internal_error"});
  });
  svr.set_logger([this](const httplib::Request&, const httplib::Response& res) {
    state->metrics.http_response(res.status);
  });
}

// -- http_server ----------------------------------------------------------------

http_server::http_server(server_options options) : impl_(std::make_unique<impl>(std::move(options))) {
  impl& s = *impl_;
  std::size_t threads = s.opt.http_threads ? s.opt.http_threads : s.opt.max_inflight + 16;
  s.svr.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  s.svr.set_tcp_nodelay(true);
  s.svr.set_read_timeout(s.opt.read_timeout_s, 0);
  s.svr.set_write_timeout(s.opt.write_timeout_s, 0);
  s.svr.set_keep_alive_timeout(s.opt.keep_alive_timeout_s);
  s.svr.set_keep_alive_max_count(100);
  s.svr.set_payload_max_length(s.opt.max_body_bytes);
  impl* state = impl_.get();
  s.svr.set_socket_options([state](socket_t sock) {
    httplib::default_socket_options(sock);  // SO_REUSEADDR as before
    state->listen_fd = sock;
  });
  s.routes();
}

http_server::~http_server() {
  stop();
}

result<int> http_server::bind() {
  impl& s = *impl_;
  if (!is_loopback_host(s.opt.host) && s.opt.api_key.empty())
    return make_error(error_code::invalid_argument,
                      "--host " + s.opt.host +
                          " is reachable from other machines: give --api-key-file, or bind to 127.0.0.1");
  if (s.opt.max_inflight == 0)
    return make_error(error_code::invalid_argument, "the in-flight limit must be at least 1");
  if (s.opt.port == 0) {
    s.port = s.svr.bind_to_any_port(s.opt.host);
    if (s.port < 0)
      return make_error(error_code::io_error, "cannot bind to " + s.opt.host + " on any port");
  } else {
    if (!s.svr.bind_to_port(s.opt.host, s.opt.port))
      return make_error(error_code::io_error,
                        "cannot bind to " + s.opt.host + ":" + std::to_string(s.opt.port) + " (in use?)");
    s.port = s.opt.port;
  }
  // httplib 0.11 listens with a backlog of 5: a burst of new connections overflows it and
  // the dropped handshakes cost a 1 s SYN retry each. listen() again raises it (Linux).
  if (s.listen_fd >= 0)
    ::listen(s.listen_fd, 1024);
  return s.port;
}

void http_server::start() {
  // A write to a closed connection must fail with EPIPE, not kill the process
  // (cpp-httplib 0.11 sends without MSG_NOSIGNAL).
  std::signal(SIGPIPE, SIG_IGN);
  impl* s = impl_.get();
  s->listener = std::thread([s] { s->svr.listen_after_bind(); });
}

void http_server::attach(std::shared_ptr<Engine> engine, std::shared_ptr<const tokenizer::tokenizer> tok) {
  impl& s = *impl_;
  s.engine = std::move(engine);
  s.tok = std::move(tok);
  s.vocab = s.engine->vocab_size();
  s.max_context = s.engine->max_context_tokens();
  for (std::int32_t id : s.engine->eos_token_ids())
    s.stop_ids.insert(id);
  if (s.tok)
    if (auto eos = s.tok->eos_id(); eos && *eos >= 0 && std::size_t(*eos) < s.vocab && !s.stop_ids.count(*eos)) {
      s.stop_ids.insert(*eos);
      s.extra_stop_ids.push_back(*eos);
    }
  s.ready = true;
}

void http_server::stop() {
  impl& s = *impl_;
  s.shutting_down = true;  // waiting handlers notice within poll_interval and end their streams
  if (s.listener.joinable()) {
    s.svr.stop();
    s.listener.join();
  }
}

int http_server::port() const {
  return impl_->port;
}

const server_metrics& http_server::metrics() const {
  return impl_->state->metrics;
}

}  // namespace moert::server
