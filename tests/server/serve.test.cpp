// `moert serve` as a client meets it: a real process on loopback, driven by a real HTTP client
// (cpp-httplib's). Every wait has a timeout; each server is killed at the end.
#include <catch2/catch.hpp>

#include "server/server.hpp"
#include "test_support.hpp"
#include "tokenizer/tokenizer.hpp"

#include <httplib.h>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <fstream>
#include <map>
#include <memory>
#include <regex>
#include <set>
#include <sstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

namespace {

// The client side writes to sockets the server may have closed (413, disconnect tests).
const bool sigpipe_ignored = [] {
  ::signal(SIGPIPE, SIG_IGN);
  return true;
}();

fs::path scratch_dir() {
  fs::path dir = fs::temp_directory_path() / ("moert_serve_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return dir;
}

using moert::test::slurp;

double ms_since(steady::time_point t) {
  return std::chrono::duration<double, std::milli>(steady::now() - t).count();
}

// A `moert serve` child process with its output in a log file.
class server_process {
public:
  explicit server_process(std::vector<std::string> args, bool wait_ready = true) {
    static int counter = 0;
    log_ = scratch_dir() / ("serve_" + std::to_string(++counter) + ".log");
    args.insert(args.begin(), {MOERT_BINARY, "serve"});
    std::vector<char*> argv;
    for (auto& a : args)
      argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::execv(MOERT_BINARY, argv.data());
      ::_exit(127);
    }
    if (!wait_ready)
      return;
    // The port comes from the "listening on" line (the server binds port 0).
    std::regex listening{R"(listening on http://127\.0\.0\.1:(\d+))"};
    auto until = steady::now() + 30s;
    std::smatch m;
    std::string text;
    while (steady::now() < until) {
      text = slurp(log_);
      if (std::regex_search(text, m, listening))
        break;
      REQUIRE(running());
      std::this_thread::sleep_for(20ms);
    }
    INFO(text);
    REQUIRE(std::regex_search(text, m, listening));
    port_ = std::stoi(m[1]);
    // Ready once /health says 200 (503 while loading).
    until = steady::now() + 120s;
    int status = 0;
    while (steady::now() < until) {
      auto c = client();
      if (auto r = c.Get("/health"); r && (status = r->status) == 200)
        break;
      REQUIRE(running());
      std::this_thread::sleep_for(50ms);
    }
    INFO(slurp(log_));
    REQUIRE(status == 200);
  }
  ~server_process() { stop(); }

  httplib::Client client(int read_timeout_s = 120) const {
    httplib::Client c{"127.0.0.1", port_};
    c.set_connection_timeout(5, 0);
    c.set_read_timeout(read_timeout_s, 0);
    c.set_write_timeout(10, 0);
    return c;
  }
  int port() const { return port_; }
  std::string log() const { return slurp(log_); }
  bool running() {
    if (exited_)
      return false;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      exited_ = true;
      exit_status_ = status;
      return false;
    }
    return true;
  }
  // Waits up to `timeout` for the process to exit on its own; its exit code, or -1.
  int wait_exit(std::chrono::milliseconds timeout) {
    auto until = steady::now() + timeout;
    while (running() && steady::now() < until)
      std::this_thread::sleep_for(10ms);
    if (running())
      return -1;
    return WIFEXITED(exit_status_) ? WEXITSTATUS(exit_status_) : -1;
  }
  void signal(int sig) {
    if (running())
      ::kill(pid_, sig);
  }
  // SIGTERM, then SIGKILL after 10 s.
  int stop() {
    signal(SIGTERM);
    int code = wait_exit(10s);
    if (running()) {
      ::kill(pid_, SIGKILL);
      wait_exit(5s);
    }
    return code;
  }

private:
  fs::path log_;
  pid_t pid_ = -1;
  int port_ = -1;
  bool exited_ = false;
  int exit_status_ = 0;
};

httplib::Result post(httplib::Client& c, const std::string& path, const json& body,
                     const httplib::Headers& headers = {}) {
  return c.Post(path.c_str(), headers, body.dump(), "application/json");
}

// The payloads of a server-sent-event body; REQUIREs the framing and the final [DONE].
std::vector<std::string> sse_payloads(const std::string& body) {
  std::vector<std::string> out;
  std::size_t at = 0;
  while (at < body.size()) {
    std::size_t end = body.find("\n\n", at);
    INFO(body);
    REQUIRE(end != std::string::npos);
    std::string event = body.substr(at, end - at);
    REQUIRE(event.rfind("data: ", 0) == 0);
    out.push_back(event.substr(6));
    at = end + 2;
  }
  REQUIRE(!out.empty());
  CHECK(out.back() == "[DONE]");
  return out;
}

std::vector<json> sse_chunks(const std::string& body) {
  std::vector<json> out;
  for (const auto& p : sse_payloads(body))
    if (p != "[DONE]")
      out.push_back(json::parse(p));
  return out;
}

// The streamed text of an SSE body, or nullopt when the framing is off. Uses no Catch macro:
// it runs on client threads, and Catch2 is not thread-safe (an INFO/REQUIRE there corrupted
// the heap: "double free or corruption", once a hang in the overload case).
std::optional<std::string> sse_text_off_main_thread(const std::string& body) {
  std::string text;
  std::size_t at = 0;
  bool done = false;
  while (at < body.size()) {
    std::size_t end = body.find("\n\n", at);
    if (end == std::string::npos || body.compare(at, 6, "data: ") != 0)
      return std::nullopt;
    std::string payload = body.substr(at + 6, end - at - 6);
    at = end + 2;
    if (payload == "[DONE]") {
      done = true;
      continue;
    }
    json chunk = json::parse(payload, nullptr, false);
    if (chunk.is_discarded() || !chunk.contains("choices") || chunk["choices"].empty())
      return std::nullopt;
    text += chunk["choices"][0]["text"].get<std::string>();
  }
  if (!done)
    return std::nullopt;
  return text;
}

// {"error": {"message", "type", "param", "code"}} with the expected param/code when given.
void check_error(const httplib::Result& r, int status, const std::string& param = {}, const std::string& code = {}) {
  REQUIRE(r);
  INFO(r->body);
  CHECK(r->status == status);
  json body = json::parse(r->body, nullptr, false);
  REQUIRE(body.is_object());
  REQUIRE(body.contains("error"));
  const json& e = body["error"];
  CHECK(e["message"].is_string());
  CHECK(!e["message"].get<std::string>().empty());
  CHECK(e["type"].is_string());
  CHECK(e.contains("param"));
  CHECK(e.contains("code"));
  if (!param.empty())
    CHECK(e["param"] == param);
  if (!code.empty())
    CHECK(e["code"] == code);
  CHECK(r->get_header_value("Content-Type").find("application/json") == 0);
}

// -- a checker of the Prometheus text exposition format (0.0.4) --------------------

struct prom_sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value;
};

bool metric_name(const std::string& s) {
  return std::regex_match(s, std::regex{"[a-zA-Z_:][a-zA-Z0-9_:]*"});
}

double prom_value(const std::string& s) {
  if (s == "+Inf")
    return INFINITY;
  if (s == "-Inf")
    return -INFINITY;
  if (s == "NaN")
    return NAN;
  std::size_t used = 0;
  double v = std::stod(s, &used);
  if (used != s.size())
    throw std::invalid_argument("not a Prometheus value: '" + s + "'");
  return v;
}

std::vector<prom_sample> parse_prometheus(const std::string& text) {
  std::vector<prom_sample> samples;
  std::map<std::string, std::string> types;  // family -> type
  std::set<std::string> helped, sampled_families;
  auto family_of = [&](const std::string& name) {
    for (const char* suffix : {"_bucket", "_sum", "_count"}) {
      std::string s = suffix;
      if (name.size() > s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0) {
        std::string base = name.substr(0, name.size() - s.size());
        if (types.count(base) && (types[base] == "histogram" || types[base] == "summary"))
          return base;
      }
    }
    return name;
  };
  std::istringstream in{text};
  std::string line;
  REQUIRE(!text.empty());
  CHECK(text.back() == '\n');
  while (std::getline(in, line)) {
    INFO("line: " << line);
    if (line.empty())
      continue;
    if (line[0] == '#') {
      std::istringstream words{line};
      std::string hash, kind, name;
      words >> hash >> kind >> name;
      if (kind == "HELP") {
        REQUIRE(metric_name(name));
        CHECK(helped.insert(name).second);
      } else if (kind == "TYPE") {
        std::string type;
        words >> type;
        REQUIRE(metric_name(name));
        CHECK(std::set<std::string>{"counter", "gauge", "histogram", "summary", "untyped"}.count(type));
        CHECK(!types.count(name));           // once per family
        CHECK(!sampled_families.count(name));  // before its samples
        types[name] = type;
      }
      continue;
    }
    prom_sample s;
    std::size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ')
      ++i;
    s.name = line.substr(0, i);
    REQUIRE(metric_name(s.name));
    if (i < line.size() && line[i] == '{') {
      ++i;
      while (line.at(i) != '}') {
        std::size_t eq = line.find('=', i);
        REQUIRE(eq != std::string::npos);
        std::string label = line.substr(i, eq - i);
        REQUIRE(std::regex_match(label, std::regex{"[a-zA-Z_][a-zA-Z0-9_]*"}));
        i = eq + 1;
        REQUIRE(line.at(i) == '"');
        std::string value;
        for (++i; line.at(i) != '"'; ++i) {
          if (line[i] == '\\') {
            char esc = line.at(++i);
            REQUIRE((esc == '\\' || esc == '"' || esc == 'n'));
            value += esc == 'n' ? '\n' : esc;
          } else {
            value += line[i];
          }
        }
        ++i;
        CHECK(s.labels.emplace(label, value).second);
        if (line.at(i) == ',')
          ++i;
      }
      ++i;
    }
    REQUIRE(i < line.size());
    REQUIRE(line[i] == ' ');
    std::istringstream rest{line.substr(i + 1)};
    std::string value, timestamp, extra;
    rest >> value >> timestamp >> extra;
    s.value = prom_value(value);
    if (!timestamp.empty())
      CHECK(std::regex_match(timestamp, std::regex{"-?[0-9]+"}));
    CHECK(extra.empty());
    std::string family = family_of(s.name);
    CHECK(types.count(family));  // every sample belongs to a declared family
    sampled_families.insert(family);
    if (types[family] == "counter")
      CHECK(s.value >= 0);
    samples.push_back(std::move(s));
  }
  // Histograms: cumulative buckets ending in +Inf == _count.
  for (const auto& [family, type] : types) {
    if (type != "histogram")
      continue;
    std::vector<std::pair<double, double>> buckets;
    double count = -1;
    for (const auto& s : samples) {
      if (s.name == family + "_bucket") {
        REQUIRE(s.labels.count("le"));
        buckets.emplace_back(prom_value(s.labels.at("le")), s.value);
      } else if (s.name == family + "_count") {
        count = s.value;
      }
    }
    INFO(family);
    REQUIRE(!buckets.empty());
    for (std::size_t i = 1; i < buckets.size(); ++i) {
      CHECK(buckets[i].first > buckets[i - 1].first);
      CHECK(buckets[i].second >= buckets[i - 1].second);
    }
    CHECK(std::isinf(buckets.back().first));
    CHECK(buckets.back().second == count);
  }
  return samples;
}

double metric(const std::vector<prom_sample>& samples, const std::string& name,
              const std::map<std::string, std::string>& labels = {}) {
  for (const auto& s : samples) {
    if (s.name != name)
      continue;
    bool match = true;
    for (const auto& [k, v] : labels)
      match = match && s.labels.count(k) && s.labels.at(k) == v;
    if (match)
      return s.value;
  }
  FAIL("no sample " << name);
  return 0;
}

std::vector<prom_sample> scrape(const server_process& s) {
  auto c = s.client();
  auto r = c.Get("/metrics");
  REQUIRE(r);
  REQUIRE(r->status == 200);
  CHECK(r->get_header_value("Content-Type").find("text/plain") == 0);
  return parse_prometheus(r->body);
}

// Polls /metrics until `done` holds (timeout 15 s).
template <class Pred>
std::vector<prom_sample> scrape_until(const server_process& s, Pred done) {
  auto until = steady::now() + 15s;
  std::vector<prom_sample> m = scrape(s);
  while (!done(m) && steady::now() < until) {
    std::this_thread::sleep_for(20ms);
    m = scrape(s);
  }
  return m;
}

// A streamed request that the client abandons (closes the connection) once `abandon` is set,
// or after its first chunk when `abandon` is null. Runs on its own thread.
struct abandoning_stream {
  std::atomic<bool> got_first{false};
  std::atomic<bool> abandon{false};
  std::atomic<bool> finished{false};
  std::thread thread;

  abandoning_stream(const server_process& s, json body, bool after_first) {
    body["stream"] = true;
    thread = std::thread([this, &s, body, after_first] {
      auto c = s.client();
      httplib::Request req;
      req.method = "POST";
      req.path = "/v1/completions";
      req.body = body.dump();
      req.set_header("Content-Type", "application/json");
      req.content_receiver = [this, after_first](const char* data, std::size_t size, std::uint64_t, std::uint64_t) {
        if (std::string(data, size).find("data: ") != std::string::npos)
          got_first = true;
        return !(after_first ? got_first.load() : abandon.load());
      };
      c.send(req);
      finished = true;
    });
  }
  ~abandoning_stream() {
    abandon = true;
    if (thread.joinable())
      thread.join();
  }
  bool wait_first(std::chrono::seconds timeout) {
    auto until = steady::now() + timeout;
    while (!got_first && steady::now() < until)
      std::this_thread::sleep_for(5ms);
    return got_first;
  }
};

// The embedded default model, no tokenizer: prompts are ids, text is "id id id".
server_process& default_server() {
  static server_process server{{"--port", "0", "--max-inflight", "40"}};
  return server;
}

std::vector<std::int32_t> ids_of(const std::string& text) {
  std::vector<std::int32_t> out;
  std::istringstream in{text};
  std::int64_t v;
  while (in >> v)
    out.push_back(std::int32_t(v));
  return out;
}

}  // namespace

// -- the embedded default --------------------------------------------------------

TEST_CASE("health, models, unknown routes") {
  server_process& s = default_server();
  auto c = s.client();
  auto r = c.Get("/health");
  REQUIRE(r);
  CHECK(r->status == 200);
  r = c.Get("/v1/models");
  REQUIRE(r);
  CHECK(r->status == 200);
  json models = json::parse(r->body);
  CHECK(models["data"][0]["id"] == "moert-default");
  check_error(c.Get("/v1/nothing"), 404, "", "not_found");
  check_error(c.Get("/v1/completions"), 404);
  CHECK(s.log().find("moert: listening on http://127.0.0.1:") != std::string::npos);
}

TEST_CASE("completions: non-streamed and streamed give the same greedy text; usage only when asked") {
  server_process& s = default_server();
  auto c = s.client();
  json body = {{"model", "moert-default"}, {"prompt", {1, 2, 3}}, {"max_tokens", 6}, {"temperature", 0}};
  auto r = post(c, "/v1/completions", body);
  REQUIRE(r);
  INFO(r->body);
  REQUIRE(r->status == 200);
  json full = json::parse(r->body);
  CHECK(full["object"] == "text_completion");
  CHECK(full["model"] == "moert-default");
  CHECK(full["id"].get<std::string>().rfind("cmpl-", 0) == 0);
  std::string text = full["choices"][0]["text"];
  CHECK(ids_of(text).size() == 6);
  CHECK(full["choices"][0]["finish_reason"] == "length");
  CHECK(full["usage"] == json{{"prompt_tokens", 3}, {"completion_tokens", 6}, {"total_tokens", 9}});

  body["stream"] = true;
  r = post(c, "/v1/completions", body);
  REQUIRE(r);
  REQUIRE(r->status == 200);
  CHECK(r->get_header_value("Content-Type").find("text/event-stream") == 0);
  auto chunks = sse_chunks(r->body);
  std::string streamed;
  for (std::size_t i = 0; i < chunks.size(); ++i) {
    CHECK(chunks[i]["object"] == "text_completion");
    CHECK(!chunks[i].contains("usage"));
    streamed += chunks[i]["choices"][0]["text"].get<std::string>();
    CHECK(chunks[i]["choices"][0]["finish_reason"] == (i + 1 == chunks.size() ? json("length") : json(nullptr)));
  }
  CHECK(streamed == text);
  CHECK(chunks.size() >= 6);  // one chunk per token, then the finish chunk

  body["stream_options"] = {{"include_usage", true}};
  r = post(c, "/v1/completions", body);
  REQUIRE(r);
  chunks = sse_chunks(r->body);
  REQUIRE(chunks.size() >= 2);
  CHECK(chunks.back()["choices"] == json::array());
  CHECK(chunks.back()["usage"] == json{{"prompt_tokens", 3}, {"completion_tokens", 6}, {"total_tokens", 9}});
  for (std::size_t i = 0; i + 1 < chunks.size(); ++i)
    CHECK(chunks[i]["usage"].is_null());
}

TEST_CASE("the same seeded sampled request gives the same text alone and among 16 concurrent ones") {
  server_process& s = default_server();
  json body = {{"prompt", {5, 6, 7}}, {"max_tokens", 12}, {"temperature", 1.0}, {"seed", 1234}};
  auto c = s.client();
  auto alone = post(c, "/v1/completions", body);
  REQUIRE(alone);
  REQUIRE(alone->status == 200);
  std::string expected = json::parse(alone->body)["choices"][0]["text"];
  REQUIRE(ids_of(expected).size() == 12);

  std::vector<std::string> texts(16);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (std::size_t i = 0; i < 24; ++i)
    threads.emplace_back([&, i] {
      auto ci = s.client();
      json b = body;
      if (i >= 16) {  // other traffic at the same time: other prompts, seeds, streams
        b["prompt"] = {int(i), 9};
        b["seed"] = int(i);
        b["stream"] = i % 2 == 0;
      } else if (i % 2) {
        b["stream"] = true;
      }
      auto r = post(ci, "/v1/completions", b);
      if (!r || r->status != 200) {
        failures++;
        return;
      }
      if (i >= 16)
        return;
      if (b.value("stream", false)) {
        auto t = sse_text_off_main_thread(r->body);
        if (!t) {
          failures++;
          return;
        }
        texts[i] = *t;
      } else {
        texts[i] = json::parse(r->body)["choices"][0]["text"];
      }
    });
  for (auto& t : threads)
    t.join();
  CHECK(failures == 0);
  for (std::size_t i = 0; i < 16; ++i) {
    INFO("request " << i);
    CHECK(texts[i] == expected);
  }
  // Another seed, another text; the first seed again, the first text.
  json other = body;
  other["seed"] = 99;
  auto r = post(c, "/v1/completions", other);
  REQUIRE(r);
  CHECK(json::parse(r->body)["choices"][0]["text"] != expected);
  r = post(c, "/v1/completions", body);
  REQUIRE(r);
  CHECK(json::parse(r->body)["choices"][0]["text"] == expected);
}

TEST_CASE("stop strings cut the text exactly, streamed or not, and leave the stop text out") {
  server_process& s = default_server();
  auto c = s.client();
  json body = {{"prompt", {11, 12}}, {"max_tokens", 10}, {"temperature", 0}};
  auto r = post(c, "/v1/completions", body);
  REQUIRE(r);
  std::string text = json::parse(r->body)["choices"][0]["text"];
  auto ids = ids_of(text);
  REQUIRE(ids.size() == 10);
  // The stop string spans two tokens' text: the end of id 4, a space, the start of id 5.
  std::string a = std::to_string(ids[4]), b = std::to_string(ids[5]);
  std::string stop = a.substr(a.size() - 1) + " " + b.substr(0, 1);
  std::string expected = text.substr(0, text.find(stop));
  for (bool stream : {false, true}) {
    INFO("stream " << stream << ", stop '" << stop << "' in '" << text << "'");
    json b2 = body;
    b2["stop"] = {"never there", stop};
    b2["stream"] = stream;
    r = post(c, "/v1/completions", b2);
    REQUIRE(r);
    REQUIRE(r->status == 200);
    std::string got;
    json finish;
    if (stream) {
      for (const json& ch : sse_chunks(r->body)) {
        got += ch["choices"][0]["text"].get<std::string>();
        finish = ch["choices"][0]["finish_reason"];
      }
    } else {
      got = json::parse(r->body)["choices"][0]["text"];
      finish = json::parse(r->body)["choices"][0]["finish_reason"];
    }
    CHECK(got == expected);
    CHECK(finish == "stop");
  }
}

TEST_CASE("malformed JSON, an unknown model and bad parameters get OpenAI-style 4xx") {
  server_process& s = default_server();
  auto c = s.client();
  check_error(c.Post("/v1/completions", "{\"prompt\": [1", "application/json"), 400, "", "invalid_json");
  check_error(post(c, "/v1/completions", {{"model", "gpt-9"}, {"prompt", {1}}}), 404, "model", "model_not_found");
  check_error(post(c, "/v1/completions", {{"prompt", {1}}, {"temperature", 3}}), 400, "temperature");
  check_error(post(c, "/v1/completions", {{"prompt", {1}}, {"max_tokens", -1}}), 400, "max_tokens");
  check_error(post(c, "/v1/completions", {{"prompt", {1}}, {"top_p", 0}}), 400, "top_p");
  check_error(post(c, "/v1/completions", {{"prompt", {1}}, {"n", 2}}), 400, "n");
  check_error(post(c, "/v1/completions", {{"prompt", {1, 4096}}}), 400, "prompt");  // vocab is 4096
  check_error(post(c, "/v1/completions", {{"prompt", "text needs a tokenizer"}}), 400, "prompt");
  check_error(post(c, "/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "hi"}}}}}), 400,
              "messages");
  // The context is 4096 tokens.
  check_error(post(c, "/v1/completions", {{"prompt", std::vector<int>(4097, 1)}}), 400, "prompt",
              "context_length_exceeded");
  check_error(post(c, "/v1/completions", {{"prompt", {1, 2}}, {"max_tokens", 4095}}), 400, "max_tokens",
              "context_length_exceeded");
  auto ok = post(c, "/v1/completions", {{"prompt", {1, 2}}, {"max_tokens", 1}});
  REQUIRE(ok);
  CHECK(ok->status == 200);
}

TEST_CASE("a 10 MiB body is refused with 413, with or without Content-Length") {
  server_process& s = default_server();
  auto c = s.client();
  std::string big = "{\"prompt\": \"" + std::string(10 << 20, 'a') + "\"}";
  auto t0 = steady::now();
  check_error(c.Post("/v1/completions", big, "application/json"), 413, "", "payload_too_large");
  INFO("took " << ms_since(t0) << " ms");
  // Chunked upload (no Content-Length): cut at the limit while reading.
  auto c2 = s.client();
  std::size_t sent = 0;
  auto r = c2.Post(
      "/v1/completions",
      [&](std::size_t, httplib::DataSink& sink) {
        if (sent >= big.size()) {
          sink.done();
          return true;
        }
        std::size_t n = std::min<std::size_t>(64 << 10, big.size() - sent);
        bool ok = sink.write(big.data() + sent, n);
        sent += n;
        return ok;
      },
      "application/json");
  if (r)  // the server may close before the client finishes sending: that is a refusal too
    check_error(r, 413, "", "payload_too_large");
  auto after = s.client().Get("/health");
  REQUIRE(after);
  CHECK(after->status == 200);
}

TEST_CASE("a client that disconnects mid-stream frees its request; the engine reports it cancelled") {
  server_process& s = default_server();
  auto before = scrape(s);
  double cancelled0 = metric(before, "moert_request_finished_total", {{"finished_reason", "cancelled"}});
  double engine0 = metric(before, "moert_engine_requests_finished_total", {{"reason", "cancelled"}});
  double tokens0 = metric(before, "moert_generation_tokens_total");
  {
    abandoning_stream stream{s, {{"prompt", {3, 4}}, {"max_tokens", 4000}, {"ignore_eos", true}}, true};
    REQUIRE(stream.wait_first(30s));
    stream.thread.join();
  }
  auto t0 = steady::now();
  auto after = scrape_until(s, [&](const auto& m) {
    return metric(m, "moert_engine_requests_finished_total", {{"reason", "cancelled"}}) > engine0 &&
           metric(m, "moert_server_requests_in_flight") == 0;
  });
  WARN("disconnected stream freed (engine reports cancelled) after " << ms_since(t0) << " ms");
  CHECK(metric(after, "moert_request_finished_total", {{"finished_reason", "cancelled"}}) == cancelled0 + 1);
  CHECK(metric(after, "moert_engine_requests_finished_total", {{"reason", "cancelled"}}) == engine0 + 1);
  CHECK(metric(after, "moert_server_requests_in_flight") == 0);
  CHECK(metric(after, "moert_num_requests_running") == 0);
  CHECK(metric(after, "moert_client_disconnects_total") >= 1);
  CHECK(metric(after, "moert_generation_tokens_total") - tokens0 < 4000);  // it did not run to the end
}

TEST_CASE("a client that disconnects while a non-streamed request runs frees it too") {
  server_process& s = default_server();
  auto before = scrape(s);
  double engine0 = metric(before, "moert_engine_requests_finished_total", {{"reason", "cancelled"}});
  double tokens0 = metric(before, "moert_generation_tokens_total");
  // cpp-httplib's client cannot abandon a request midway: a raw socket writes the request
  // and closes after 300 ms.
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(std::uint16_t(s.port()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  std::string body = json{{"prompt", {8, 9}}, {"max_tokens", 4000}, {"ignore_eos", true}}.dump();
  std::string request = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        "Content-Length: " +
                        std::to_string(body.size()) + "\r\n\r\n" + body;
  REQUIRE(::send(fd, request.data(), request.size(), 0) == ssize_t(request.size()));
  auto running = scrape_until(s, [](const auto& m) { return metric(m, "moert_server_requests_in_flight") >= 1; });
  REQUIRE(metric(running, "moert_server_requests_in_flight") >= 1);
  std::this_thread::sleep_for(300ms);
  ::close(fd);
  auto after = scrape_until(s, [&](const auto& m) {
    return metric(m, "moert_engine_requests_finished_total", {{"reason", "cancelled"}}) > engine0 &&
           metric(m, "moert_server_requests_in_flight") == 0;
  });
  CHECK(metric(after, "moert_engine_requests_finished_total", {{"reason", "cancelled"}}) == engine0 + 1);
  CHECK(metric(after, "moert_server_requests_in_flight") == 0);
  CHECK(metric(after, "moert_generation_tokens_total") - tokens0 < 4000);
}

TEST_CASE("/metrics parses as Prometheus text and counts what happened") {
  server_process& s = default_server();
  auto c = s.client();
  REQUIRE(post(c, "/v1/completions", {{"prompt", {1, 2, 3}}, {"max_tokens", 2}}));
  auto m = scrape(s);
  CHECK(metric(m, "moert_model_loaded") == 1);
  CHECK(metric(m, "moert_prompt_tokens_total") >= 3);
  CHECK(metric(m, "moert_generation_tokens_total") >= 2);
  CHECK(metric(m, "moert_time_to_first_token_seconds_count") >= 1);
  CHECK(metric(m, "moert_e2e_request_latency_seconds_count") >= 1);
  CHECK(metric(m, "moert_request_finished_total", {{"finished_reason", "length"}}) >= 1);
  CHECK(metric(m, "moert_num_requests_waiting") >= 0);
  CHECK(metric(m, "moert_expert_batch_size_mean") > 0);
  CHECK(metric(m, "moert_device_busy_ratio") >= 0);
  CHECK(metric(m, "moert_http_responses_total", {{"code", "4xx"}}) >= 0);
  // The checker itself rejects what is not the format.
  CHECK_THROWS(prom_value("1.0x"));
}

// -- the server library in-process: listening before the model is there ------------------

TEST_CASE("/health is 503 and generation refused until the model is attached, 200 after") {
  moert::server::server_options opt;
  opt.port = 0;
  opt.model_name = "tiny";
  moert::server::http_server http{opt};
  auto port = http.bind();
  REQUIRE(port);
  http.start();
  httplib::Client c{"127.0.0.1", *port};
  c.set_read_timeout(60, 0);
  auto r = c.Get("/health");
  REQUIRE(r);
  CHECK(r->status == 503);
  CHECK(json::parse(r->body)["status"] == "loading");
  check_error(post(c, "/v1/completions", {{"prompt", {1}}}), 503, "", "model_loading");
  CHECK(post(c, "/v1/completions", {{"prompt", {1}}})->get_header_value("Retry-After") == "1");
  auto m = c.Get("/metrics");
  REQUIRE(m);
  CHECK(metric(parse_prometheus(m->body), "moert_model_loaded") == 0);

  moert::EngineConfig config;
  config.synthetic_config = json{{"model_type", "qwen3_moe"},   {"vocab_size", 64},       {"hidden_size", 32},
                                 {"num_hidden_layers", 1},      {"num_attention_heads", 4}, {"num_key_value_heads", 2},
                                 {"head_dim", 8},               {"num_experts", 4},       {"num_experts_per_tok", 2},
                                 {"moe_intermediate_size", 16}, {"max_position_embeddings", 128}}
                                .dump();
  auto engine = moert::Engine::create(config);
  REQUIRE(engine);
  std::shared_ptr<moert::Engine> shared{std::move(engine.value())};
  http.attach(shared, nullptr);
  r = c.Get("/health");
  REQUIRE(r);
  CHECK(r->status == 200);
  r = post(c, "/v1/completions", {{"prompt", {1, 2}}, {"max_tokens", 3}});
  REQUIRE(r);
  CHECK(r->status == 200);
  CHECK(json::parse(r->body)["model"] == "tiny");
  // The context is 128 tokens here.
  check_error(post(c, "/v1/completions", {{"prompt", {1, 2}}, {"max_tokens", 127}}), 400, "max_tokens",
              "context_length_exceeded");
  http.stop();
  shared->shutdown();
}

// -- faults --------------------------------------------------------------------------

TEST_CASE("serve --faults: a recoverable fault file changes no completion, concurrent or not") {
  // Message faults at every kind and an expert killed mid-run, on another placement than the
  // fault-free server's (outputs do not depend on it); short retransmission timeouts.
  fs::path plan = scratch_dir() / "serve_faults.json";
  std::ofstream{plan} << R"({"seed": 7, "drop": 0.05, "duplicate": 0.05, "reorder": 0.05,
    "delay": {"probability": 0.1, "max_ms": 3},
    "kill": [{"actor": "expert", "device": 1, "after_messages": 40}],
    "retransmit": {"ms": 5, "max_ms": 40, "max_retries": 30}})";
  server_process& clean = default_server();
  server_process faulty{{"--port", "0", "--max-inflight", "40", "--ag", "2", "--eg", "3", "--faults", plan.string()}};
  std::vector<json> bodies;
  for (int i = 0; i < 8; ++i) {
    json b = {{"prompt", {1 + i, 20, 3 * i + 2}}, {"max_tokens", 8}, {"ignore_eos", true}};
    if (i % 2)
      b["temperature"] = 0;
    else
      b.update({{"temperature", 0.9}, {"seed", 100 + i}});
    b["stream"] = i % 3 == 0;
    bodies.push_back(b);
  }
  // Each server gets every request at once, from its own threads; checked here after.
  auto texts_of = [&](server_process& s) {
    std::vector<std::optional<std::string>> texts(bodies.size());
    std::vector<std::thread> threads;
    for (std::size_t i = 0; i < bodies.size(); ++i)
      threads.emplace_back([&, i] {
        auto c = s.client();
        auto r = post(c, "/v1/completions", bodies[i]);
        if (!r || r->status != 200)
          return;
        texts[i] = bodies[i]["stream"].get<bool>() ? sse_text_off_main_thread(r->body)
                                                   : std::optional<std::string>{
                                                         json::parse(r->body)["choices"][0]["text"].get<std::string>()};
      });
    for (auto& t : threads)
      t.join();
    return texts;
  };
  auto expected = texts_of(clean);
  auto start = steady::now();
  auto got = texts_of(faulty);
  double took_ms = ms_since(start);
  for (std::size_t i = 0; i < bodies.size(); ++i) {
    INFO("request " << i << ": " << bodies[i].dump());
    REQUIRE(expected[i]);
    REQUIRE(ids_of(*expected[i]).size() == 8);
    REQUIRE(got[i]);
    CHECK(*got[i] == *expected[i]);
  }
  // Once more one at a time: the same texts.
  for (std::size_t i = 0; i < bodies.size(); i += 3) {
    auto c = faulty.client();
    json b = bodies[i];
    b["stream"] = false;
    auto r = post(c, "/v1/completions", b);
    REQUIRE(r);
    REQUIRE(r->status == 200);
    CHECK(json::parse(r->body)["choices"][0]["text"] == *expected[i]);
  }
  // The server says what it injected when it stops.
  faulty.stop();
  std::string log = faulty.log();
  INFO(log);
  std::size_t at = log.find("faults injected");
  REQUIRE(at != std::string::npos);
  std::string line = log.substr(at, log.find('\n', at) - at);
  WARN("serve --faults: 8 concurrent completions in " << took_ms << " ms, every one the fault-free text; " << line);
  CHECK(line.find(" 1 actors killed") != std::string::npos);
  CHECK(line.find(" 0 dropped") == std::string::npos);  // messages were dropped, and recovered
  CHECK(line.find(" 0 micro-batches failed") != std::string::npos);
}

// -- overload, keys, shutdown ---------------------------------------------------------

TEST_CASE("overload is answered 429 with Retry-After within 50 ms, and the slots come back") {
  server_process s{{"--port", "0", "--max-inflight", "2"}};
  json long_request = {{"prompt", {1, 2}}, {"max_tokens", 4000}, {"ignore_eos", true}};
  auto a = std::make_unique<abandoning_stream>(s, long_request, false);
  auto b = std::make_unique<abandoning_stream>(s, long_request, false);
  REQUIRE(a->wait_first(30s));
  REQUIRE(b->wait_first(30s));
  std::vector<double> times;
  for (int i = 0; i < 5; ++i) {
    auto c = s.client();
    auto t0 = steady::now();
    auto r = post(c, "/v1/completions", {{"prompt", {1}}, {"max_tokens", 1}, {"stream", i % 2 == 0}});
    times.push_back(ms_since(t0));
    check_error(r, 429, "", "overloaded");
    CHECK(r->get_header_value("Retry-After") == "1");
  }
  std::sort(times.begin(), times.end());
  WARN("429 answered in " << times.front() << " .. " << times.back() << " ms (median " << times[times.size() / 2]
                            << ")");
  CHECK(times[times.size() / 2] < 50.0);  // the median; every one is printed above
  CHECK(times.back() < 500.0);
  // /health still answers at once.
  auto t0 = steady::now();
  auto h = s.client().Get("/health");
  REQUIRE(h);
  CHECK(h->status == 200);
  CHECK(ms_since(t0) < 500.0);
  auto m = scrape(s);
  CHECK(metric(m, "moert_requests_rejected_overloaded_total") == 5);
  CHECK(metric(m, "moert_server_requests_in_flight") == 2);
  // The clients leave; their places come back.
  a.reset();
  b.reset();
  m = scrape_until(s, [](const auto& mm) { return metric(mm, "moert_server_requests_in_flight") == 0; });
  CHECK(metric(m, "moert_server_requests_in_flight") == 0);
  auto c = s.client();
  auto r = post(c, "/v1/completions", {{"prompt", {1}}, {"max_tokens", 2}});
  REQUIRE(r);
  CHECK(r->status == 200);
}

TEST_CASE("an API key is required when configured; a public bind without one is refused") {
  fs::path key_file = scratch_dir() / "api_key";
  std::ofstream{key_file} << "sk-test-123\n";
  server_process s{{"--port", "0", "--api-key-file", key_file.string()}};
  auto c = s.client();
  check_error(c.Get("/v1/models"), 401, "", "invalid_api_key");
  check_error(post(c, "/v1/completions", {{"prompt", {1}}}), 401, "", "invalid_api_key");
  check_error(post(c, "/v1/completions", {{"prompt", {1}}}, {{"Authorization", "Bearer sk-test-124"}}), 401, "",
              "invalid_api_key");
  auto r = c.Get("/v1/models", {{"Authorization", "Bearer sk-test-123"}});
  REQUIRE(r);
  CHECK(r->status == 200);
  r = post(c, "/v1/completions", {{"prompt", {1}}, {"max_tokens", 2}}, {{"Authorization", "Bearer sk-test-123"}});
  REQUIRE(r);
  CHECK(r->status == 200);
  r = c.Get("/health");
  REQUIRE(r);
  CHECK(r->status == 200);

  server_process open{{"--host", "0.0.0.0", "--port", "0"}, false};
  CHECK(open.wait_exit(20s) == 1);
  CHECK(open.log().find("moert: error: ") == 0);
  CHECK(open.log().find("--host 0.0.0.0 is reachable from other machines") != std::string::npos);
  CHECK(open.log().find("--api-key-file") != std::string::npos);
}

TEST_CASE("SIGTERM ends open streams and the server exits cleanly") {
  server_process s{{"--port", "0"}};
  std::atomic<bool> got_first{false};
  std::string body;
  std::thread client([&] {
    auto c = s.client();
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.body = json{{"prompt", {1}}, {"max_tokens", 4000}, {"ignore_eos", true}, {"stream", true}}.dump();
    req.set_header("Content-Type", "application/json");
    req.content_receiver = [&](const char* data, std::size_t size, std::uint64_t, std::uint64_t) {
      body.append(data, size);
      got_first = true;
      return true;
    };
    c.send(req);
  });
  auto until = steady::now() + 30s;
  while (!got_first && steady::now() < until)
    std::this_thread::sleep_for(5ms);
  REQUIRE(got_first);
  auto t0 = steady::now();
  s.signal(SIGTERM);
  CHECK(s.wait_exit(10s) == 0);
  client.join();
  INFO("exit after " << ms_since(t0) << " ms; body tail: " << body.substr(body.size() > 400 ? body.size() - 400 : 0));
  CHECK(ms_since(t0) < 5000.0);
  CHECK(body.find("\"code\":\"shutdown\"") != std::string::npos);
  CHECK(body.size() >= 14);
  CHECK(body.substr(body.size() - 14) == "data: [DONE]\n\n");
  CHECK(s.log().find("moert: stopped") != std::string::npos);
}

// -- with a tokenizer --------------------------------------------------------------------

namespace {

fs::path qwen3_tokenizer_dir() {
  fs::path dir = fs::path{MOERT_FIXTURES_DIR} / "tokenizers" / "qwen3";
  return fs::exists(dir / "tokenizer.json") ? dir : fs::path{};
}

// A tiny synthetic Qwen3-MoE whose vocabulary is the Qwen3 tokenizer's, so every id it
// encodes is valid (the fixture checkpoint's vocabulary is only 384).
fs::path qwen3_sized_config(std::size_t vocab, std::int32_t eos) {
  fs::path path = scratch_dir() / "qwen3_sized.json";
  json c = {{"model_type", "qwen3_moe"},   {"vocab_size", vocab},           {"hidden_size", 32},
            {"num_hidden_layers", 2},      {"num_attention_heads", 4},      {"num_key_value_heads", 2},
            {"head_dim", 8},               {"num_experts", 4},              {"num_experts_per_tok", 2},
            {"moe_intermediate_size", 16}, {"intermediate_size", 64},       {"max_position_embeddings", 2048},
            {"norm_topk_prob", true},      {"eos_token_id", eos},           {"tie_word_embeddings", false}};
  std::ofstream{path} << c.dump();
  return path;
}

std::string chat_text(const httplib::Result& r) {
  return json::parse(r->body)["choices"][0]["message"]["content"];
}

}  // namespace

TEST_CASE("chat and text completions through the Qwen3 tokenizer") {
  fs::path tok_dir = qwen3_tokenizer_dir();
  if (tok_dir.empty()) {
    moert::test::skip_whole_binary("fixtures/tokenizers/qwen3 not found");
    return;
  }
  auto tok = moert::tokenizer::tokenizer::load(tok_dir.string());
  REQUIRE(tok);
  fs::path config = qwen3_sized_config((*tok)->vocab_size(), (*tok)->eos_id().value_or(0));
  server_process s{{"--port", "0", "--model-config", config.string(), "--tokenizer", tok_dir.string()}};
  auto c = s.client();
  json messages = {{{"role", "system"}, {"content", "You are terse."}}, {{"role", "user"}, {"content", "Hello!"}}};
  auto rendered = (*tok)->apply_chat_template(messages, true);
  REQUIRE(rendered);
  std::size_t prompt_tokens = (*tok)->encode(*rendered, false).size();

  SECTION("chat, non-streamed and streamed") {
    json body = {{"model", "qwen3_sized"}, {"messages", messages}, {"max_tokens", 8}, {"temperature", 0}};
    auto r = post(c, "/v1/chat/completions", body);
    REQUIRE(r);
    INFO(r->body);
    REQUIRE(r->status == 200);
    json full = json::parse(r->body);
    CHECK(full["object"] == "chat.completion");
    CHECK(full["id"].get<std::string>().rfind("chatcmpl-", 0) == 0);
    CHECK(full["choices"][0]["message"]["role"] == "assistant");
    CHECK(full["usage"]["prompt_tokens"] == prompt_tokens);
    std::size_t completion = full["usage"]["completion_tokens"];
    CHECK(completion >= 1);
    CHECK(completion <= 8);
    CHECK(full["choices"][0]["finish_reason"] == (completion == 8 ? "length" : "stop"));
    std::string text = chat_text(r);

    body["stream"] = true;
    body["stream_options"] = {{"include_usage", true}};
    r = post(c, "/v1/chat/completions", body);
    REQUIRE(r);
    auto chunks = sse_chunks(r->body);
    REQUIRE(chunks.size() >= 3);
    CHECK(chunks[0]["object"] == "chat.completion.chunk");
    CHECK(chunks[0]["choices"][0]["delta"]["role"] == "assistant");
    std::string streamed;
    for (std::size_t i = 0; i + 1 < chunks.size(); ++i)
      streamed += chunks[i]["choices"][0]["delta"].value("content", "");
    CHECK(streamed == text);
    CHECK(chunks[chunks.size() - 2]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]);
    CHECK(chunks.back()["choices"] == json::array());
    CHECK(chunks.back()["usage"] == full["usage"]);
  }

  SECTION("logprobs in each endpoint's shape") {
    auto r = post(c, "/v1/chat/completions",
                  {{"messages", messages}, {"max_tokens", 4}, {"logprobs", true}, {"top_logprobs", 3},
                   {"ignore_eos", true}});
    REQUIRE(r);
    REQUIRE(r->status == 200);
    json full = json::parse(r->body);
    const json& content = full["choices"][0]["logprobs"]["content"];
    REQUIRE(content.size() == 4);
    for (const json& t : content) {
      CHECK(t["token"].is_string());
      CHECK(t["logprob"].get<double>() <= 0.0);
      REQUIRE(t["top_logprobs"].size() == 3);
      CHECK(t["top_logprobs"][0]["logprob"] >= t["top_logprobs"][1]["logprob"]);
      CHECK(t["top_logprobs"][0]["logprob"].get<double>() >= t["logprob"].get<double>() - 1e-6);
      CHECK(t["bytes"].is_array());
    }
    r = post(c, "/v1/completions", {{"prompt", "The quick brown fox"}, {"max_tokens", 3}, {"logprobs", 2},
                                    {"ignore_eos", true}, {"temperature", 0}});
    REQUIRE(r);
    REQUIRE(r->status == 200);
    full = json::parse(r->body);
    const json& lp = full["choices"][0]["logprobs"];
    CHECK(lp["tokens"].size() == 3);
    CHECK(lp["token_logprobs"].size() == 3);
    CHECK(lp["text_offset"].size() == 3);
    REQUIRE(lp["top_logprobs"].size() == 3);
    // Greedy: the chosen token is the best alternative.
    for (std::size_t i = 0; i < 3; ++i) {
      CHECK(lp["top_logprobs"][i].size() <= 2);
      CHECK(lp["top_logprobs"][i].size() >= 1);
    }
    CHECK(full["usage"]["prompt_tokens"] == (*tok)->encode("The quick brown fox", true).size());
  }

  SECTION("stop strings on decoded text") {
    json body = {{"prompt", "Once upon a time"}, {"max_tokens", 16}, {"temperature", 0}, {"ignore_eos", true}};
    auto r = post(c, "/v1/completions", body);
    REQUIRE(r);
    std::string text = json::parse(r->body)["choices"][0]["text"];
    // A stop string of two whole characters from the middle of the text.
    std::vector<std::size_t> starts;
    for (std::size_t i = 0; i < text.size(); ++i)
      if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80)
        starts.push_back(i);
    INFO("text: " << text);
    REQUIRE(starts.size() >= 6);
    std::size_t from = starts[starts.size() / 2], to = starts[starts.size() / 2 + 2];
    std::string stop = text.substr(from, to - from);
    std::string expected = text.substr(0, text.find(stop));
    for (bool stream : {false, true}) {
      json b = body;
      b["stop"] = stop;
      b["stream"] = stream;
      auto rs = post(c, "/v1/completions", b);
      REQUIRE(rs);
      std::string got;
      json finish;
      if (stream) {
        for (const json& ch : sse_chunks(rs->body)) {
          got += ch["choices"][0]["text"].get<std::string>();
          finish = ch["choices"][0]["finish_reason"];
        }
      } else {
        got = json::parse(rs->body)["choices"][0]["text"];
        finish = json::parse(rs->body)["choices"][0]["finish_reason"];
      }
      INFO("stop '" << stop << "', stream " << stream);
      CHECK(got == expected);
      CHECK(finish == "stop");
    }
  }
}

TEST_CASE("the fixture checkpoint with the Qwen3 tokenizer: ids beyond its 384-token vocabulary are refused") {
  fs::path tok_dir = qwen3_tokenizer_dir();
  fs::path model = moert::test::fixture_dir("qwen3_moe_tiny");
  if (tok_dir.empty() || model.empty()) {
    moert::test::skip_whole_binary("fixtures qwen3_moe_tiny or tokenizers/qwen3 not found");
    return;
  }
  auto tok = moert::tokenizer::tokenizer::load(tok_dir.string());
  REQUIRE(tok);
  server_process s{{"--port", "0", "--model", model.string(), "--tokenizer", tok_dir.string()}};
  CHECK(s.log().find("warning: the tokenizer has") != std::string::npos);
  auto c = s.client();
  auto r = post(c, "/v1/completions", {{"prompt", "Hello, world"}});
  check_error(r, 400, "prompt");
  CHECK(r->body.find("outside the model's vocabulary [0, 384)") != std::string::npos);
  check_error(post(c, "/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "hi"}}}}}), 400,
              "messages");
  // Token-id prompts work, and the text is the tokenizer's decode of the fixture's greedy ids.
  json prompts = json::parse(slurp(model / "prompts.json"));
  json expected = json::parse(slurp(model / "expected.json"));
  std::vector<std::int32_t> greedy = expected["prompts"][0]["greedy"];
  r = post(c, "/v1/completions",
           {{"prompt", prompts[0]}, {"max_tokens", greedy.size()}, {"temperature", 0}, {"ignore_eos", true}});
  REQUIRE(r);
  INFO(r->body);
  REQUIRE(r->status == 200);
  CHECK(json::parse(r->body)["choices"][0]["text"] == (*tok)->decode(greedy, true));
}
