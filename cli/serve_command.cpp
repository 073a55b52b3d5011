#include "serve_command.hpp"

#include "engine_options.hpp"
#include "server/server.hpp"
#include "tokenizer/tokenizer.hpp"

#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>

namespace moert::cli {

namespace {

struct serve_options {
  std::string model_dir;
  std::string model_config;  // a synthetic model of this config.json (seeded weights)
  std::string tokenizer_dir;
  std::string served_name;
  std::string api_key_file;
  std::uint64_t weight_seed = 1;
  server::server_options http;
  engine_options engine;
};

int fail(const error& err) {
  std::fprintf(stderr, "moert: error: %s\n", err.what().c_str());
  return 1;
}

result<std::string> read_file(const std::string& path, const char* what) {
  std::ifstream in{path};
  if (!in)
    return make_error(error_code::io_error, std::string{"cannot open "} + what + " '" + path + "'");
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

result<std::string> read_api_key(const std::string& path) {
  auto text = read_file(path, "--api-key-file");
  if (!text)
    return text.err();
  std::string key = *text;
  while (!key.empty() && std::isspace(static_cast<unsigned char>(key.back())))
    key.pop_back();
  while (!key.empty() && std::isspace(static_cast<unsigned char>(key.front())))
    key.erase(key.begin());
  if (key.empty())
    return make_error(error_code::invalid_argument, "--api-key-file '" + path + "' holds no key");
  if (key.find_first_of(" \t\r\n") != std::string::npos)
    return make_error(error_code::invalid_argument, "--api-key-file '" + path + "': the key contains whitespace");
  return key;
}

std::string default_name(const serve_options& opt) {
  if (!opt.model_dir.empty())
    return std::filesystem::path{opt.model_dir}.lexically_normal().filename().string().empty()
               ? std::filesystem::path{opt.model_dir}.lexically_normal().parent_path().filename().string()
               : std::filesystem::path{opt.model_dir}.lexically_normal().filename().string();
  if (!opt.model_config.empty())
    return std::filesystem::path{opt.model_config}.stem().string();
  return "moert-default";
}

// SIGINT/SIGTERM are blocked in every thread (the mask is inherited) and taken here.
class signal_watch {
public:
  signal_watch() {
    // A shell starts background jobs with SIGINT ignored, and an ignored signal is discarded
    // even while blocked: install a handler (never run, the signals stay blocked) so that
    // sigtimedwait sees them.
    struct sigaction action {};
    action.sa_handler = [](int) {};
    sigemptyset(&action.sa_mask);
    sigaction(SIGINT, &action, nullptr);
    sigaction(SIGTERM, &action, nullptr);
    sigemptyset(&set_);
    sigaddset(&set_, SIGINT);
    sigaddset(&set_, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set_, nullptr);
    thread_ = std::thread([this] {
      timespec tick{0, 100'000'000};
      while (!done_) {
        int sig = sigtimedwait(&set_, nullptr, &tick);
        if (sig == SIGINT || sig == SIGTERM) {
          signal_ = sig;
          return;
        }
      }
    });
  }
  ~signal_watch() {
    done_ = true;
    thread_.join();
  }
  int received() const { return signal_; }

private:
  sigset_t set_;
  std::atomic<bool> done_{false};
  std::atomic<int> signal_{0};
  std::thread thread_;
};

int run_serve(serve_options& opt) {
  if (!opt.model_dir.empty() && !opt.model_config.empty())
    return fail(make_error(error_code::invalid_argument, "--model and --model-config exclude each other"));
  if (!opt.api_key_file.empty()) {
    auto key = read_api_key(opt.api_key_file);
    if (!key)
      return fail(key.err());
    opt.http.api_key = *key;
  }
  opt.http.model_name = opt.served_name.empty() ? default_name(opt) : opt.served_name;
  auto config = make_engine_config(opt.engine, opt.model_dir, opt.weight_seed);
  if (!config)
    return fail(config.err());
  if (!opt.model_config.empty()) {
    auto text = read_file(opt.model_config, "--model-config");
    if (!text)
      return fail(text.err());
    config->synthetic_config = *text;
  }
  config->max_inflight_requests = opt.http.max_inflight;
  std::string tokenizer_dir = opt.tokenizer_dir;
  if (tokenizer_dir.empty() && !opt.model_dir.empty() &&
      std::filesystem::exists(std::filesystem::path{opt.model_dir} / "tokenizer.json"))
    tokenizer_dir = opt.model_dir;

  signal_watch signals;
  server::http_server http{opt.http};
  auto port = http.bind();
  if (!port)
    return fail(port.err());
  http.start();
  std::printf("moert: listening on http://%s:%d (health 503 until the model is loaded)\n", opt.http.host.c_str(),
              *port);
  std::fflush(stdout);

  auto started = std::chrono::steady_clock::now();
  std::shared_ptr<const tokenizer::tokenizer> tok;
  if (!tokenizer_dir.empty()) {
    std::printf("moert: loading tokenizer %s\n", tokenizer_dir.c_str());
    std::fflush(stdout);
    auto loaded = tokenizer::tokenizer::load(tokenizer_dir);
    if (!loaded)
      return fail(loaded.err());
    tok = *loaded;
  }
  std::printf("moert: loading model %s\n",
              !opt.model_dir.empty()      ? opt.model_dir.c_str()
              : !opt.model_config.empty() ? (opt.model_config + " (synthetic weights)").c_str()
                                          : "embedded default (configs/models/default-moe.json, random weights)");
  std::fflush(stdout);
  auto created = Engine::create(std::move(config.value()));
  if (!created)
    return fail(created.err());
  std::shared_ptr<Engine> engine{std::move(created.value())};
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (tok && tok->vocab_size() > engine->vocab_size())
    std::printf("moert: warning: the tokenizer has %zu tokens, the model %zu: prompts with ids beyond the model's "
                "vocabulary are refused (400)\n",
                tok->vocab_size(), engine->vocab_size());
  http.attach(engine, tok);
  std::printf("moert: ready in %.1f s: model '%s', vocabulary %zu, context %zu tokens, %s\n", seconds,
              opt.http.model_name.c_str(), engine->vocab_size(), engine->max_context_tokens(),
              tok ? "tokenizer loaded" : "no tokenizer (prompts as token ids, text as space-separated ids)");
  if (opt.model_dir.empty() && opt.model_config.empty())
    std::printf("moert: the embedded default has random weights: its text is noise\n");
  std::fflush(stdout);

  while (!signals.received())
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::printf("moert: %s: ending open streams and shutting down\n",
              signals.received() == SIGINT ? "SIGINT" : "SIGTERM");
  std::fflush(stdout);
  http.stop();
  engine->shutdown();
  if (status faults = report_faults(engine->report(), opt.engine); !faults.ok())
    std::fprintf(stderr, "moert: error: %s\n", faults.err().what().c_str());
  if (status traced = write_trace(*engine, opt.engine); !traced.ok())
    return fail(traced.err());
  std::printf("moert: stopped\n");
  return 0;
}

}  // namespace

command_runner add_serve_command(CLI::App& app) {
  auto opt = std::make_shared<serve_options>();
  CLI::App* sub = app.add_subcommand(
      "serve",
      "OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.\n"
      "Without --model it serves the embedded default (random weights: its text is noise). Without a\n"
      "tokenizer, prompts must be token ids and text comes back as space-separated ids; chat needs one.");
  sub->add_option("--model", opt->model_dir, "Hugging Face checkpoint directory (default: the embedded model)");
  sub->add_option("--model-config", opt->model_config,
                  "Instead: a synthetic model of this HF config.json, weights from --weight-seed");
  sub->add_option("--tokenizer", opt->tokenizer_dir,
                  "Directory with tokenizer.json (default: the --model directory when it has one)");
  sub->add_option("--weight-seed", opt->weight_seed, "Seed of synthetic weights");
  sub->add_option("--host", opt->http.host, "Address to bind (non-loopback needs --api-key-file)");
  sub->add_option("--port", opt->http.port, "Port (0: any free port)")->check(CLI::Range(0, 65535));
  sub->add_option("--api-key-file", opt->api_key_file, "File holding the Bearer key that /v1/* requires");
  sub->add_option("--served-model-name", opt->served_name, "Model name in the API (default: the directory name)");
  sub->add_option("--max-inflight", opt->http.max_inflight, "Requests generating at once; beyond: 429 at once")
      ->check(CLI::Range(1, 100000));
  sub->add_option("--http-threads", opt->http.http_threads, "HTTP workers (0: max-inflight + 16)")
      ->check(CLI::Range(0, 100000));
  sub->add_option("--max-body-bytes", opt->http.max_body_bytes, "Largest request body; beyond: 413")
      ->check(CLI::Range(1024, 1 << 30));
  sub->add_option("--request-timeout", opt->http.request_timeout_s, "Seconds a request may run before it is cancelled")
      ->check(CLI::Range(0.1, 1e7));
  sub->add_option("--default-max-tokens", opt->http.default_max_tokens,
                  "max_tokens of /v1/completions requests without one")
      ->check(CLI::Range(1, 1 << 30));
  add_engine_options(*sub, opt->engine);
  return [opt] {
    if (opt->engine.reference) {
      std::fprintf(stderr, "moert: error: serve runs the engine; --reference is not supported\n");
      return 1;
    }
    return run_serve(*opt);
  };
}

}  // namespace moert::cli
