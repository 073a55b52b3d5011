#include "commands.hpp"

#include "core/rng.hpp"
#include "model/safetensors.hpp"
#include "engine_options.hpp"
#include "model_source.hpp"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>

namespace moert::cli {

namespace {

int fail(const error& err) {
  std::fprintf(stderr, "moert: error: %s\n", err.what().c_str());
  return 1;
}

std::string join(const std::vector<std::int32_t>& ids) {
  std::string out;
  for (std::size_t i = 0; i < ids.size(); ++i)
    out += (i ? " " : "") + std::to_string(ids[i]);
  return out;
}

std::string describe(const model::model_config& c) {
  std::ostringstream out;
  out << to_string(c.arch) << ", " << c.num_layers << " layers, hidden " << c.hidden_size << ", "
      << c.num_heads << "/" << c.num_kv_heads << " heads of " << c.head_dim << ", " << c.num_experts
      << " experts top-" << c.num_experts_per_tok << ", vocab " << c.vocab_size;
  return out.str();
}

// Parses "1,2,3" or "1 2 3".
result<std::vector<std::int32_t>> parse_token_list(const std::string& text) {
  std::vector<std::int32_t> ids;
  std::string item;
  std::istringstream in{text};
  while (std::getline(in, item, ',')) {
    std::istringstream words{item};
    std::string word;
    while (words >> word) {
      char* end = nullptr;
      long long value = std::strtoll(word.c_str(), &end, 10);
      if (*end != '\0' || value < 0 || value > INT32_MAX)
        return make_error(error_code::invalid_argument, "--prompt: '" + word + "' is not a token id");
      ids.push_back(std::int32_t(value));
    }
  }
  if (ids.empty())
    return make_error(error_code::invalid_argument, "--prompt is empty");
  return ids;
}

// -- generate -----------------------------------------------------------------

struct generate_options {
  std::string model_dir;
  std::vector<std::string> prompts;
  std::string prompts_file;
  std::size_t batch = 4;
  std::size_t prompt_length = 16;
  std::size_t max_new_tokens = 32;
  float temperature = 0.0f;
  std::int32_t top_k = 0;
  float top_p = 1.0f;
  std::uint64_t seed = 0;
  std::uint64_t weight_seed = 1;
  bool recompute = false;
  engine_options engine;
};

result<std::vector<std::vector<std::int32_t>>> collect_prompts(const generate_options& opt, std::int64_t vocab) {
  std::vector<std::vector<std::int32_t>> prompts;
  if (!opt.prompts_file.empty()) {
    auto from_file = load_prompts(opt.prompts_file, vocab);
    if (!from_file)
      return from_file.err();
    prompts = std::move(from_file.value());
  }
  for (const auto& text : opt.prompts) {
    auto ids = parse_token_list(text);
    if (!ids)
      return ids.err();
    for (std::size_t i = 0; i < ids->size(); ++i)
      if ((*ids)[i] >= vocab)
        return make_error(error_code::invalid_argument,
                          "--prompt: token id " + std::to_string((*ids)[i]) + " at position " + std::to_string(i) +
                              " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
    prompts.push_back(std::move(ids.value()));
  }
  if (prompts.empty()) {  // seeded random prompts
    rng gen{opt.seed ^ 0x70726f6d7074ull};
    for (std::size_t i = 0; i < opt.batch; ++i) {
      std::vector<std::int32_t> ids(opt.prompt_length);
      for (auto& id : ids)
        id = std::int32_t(gen.next_u64() % std::uint64_t(vocab));
      prompts.push_back(std::move(ids));
    }
  }
  return prompts;
}

void print_generated(const std::vector<std::vector<std::int32_t>>& prompts,
                     const std::vector<std::vector<std::int32_t>>& out) {
  for (std::size_t i = 0; i < prompts.size(); ++i)
    std::printf("request %zu: prompt [%s]\n  -> %s\n", i + 1, join(prompts[i]).c_str(), join(out[i]).c_str());
}

std::string sampling_text(const generate_options& opt) {
  return (opt.temperature > 0 ? "temperature " + std::to_string(opt.temperature) : std::string{"greedy"}) +
         ", seed " + std::to_string(opt.seed);
}

int run_generate_reference(const generate_options& opt) {
  auto backend = reference_backend(opt.engine);
  if (!backend)
    return fail(backend.err());
  auto loaded = load_model(opt.model_dir, opt.weight_seed, reference_threads(opt.engine), *backend);
  if (!loaded)
    return fail(loaded.err());
  model::reference_model& m = *loaded->model;
  auto prompts = collect_prompts(opt, m.config().vocab_size);
  if (!prompts)
    return fail(prompts.err());
  // The engine refuses these itself (context_too_long); the bare forward would run until
  // memory runs out. Overflow-safe: -n may be anything up to 2^64 - 1.
  std::size_t context = std::size_t(m.config().max_position_embeddings);
  for (const auto& prompt : *prompts)
    if (prompt.size() > context || opt.max_new_tokens > context - prompt.size())
      return fail(make_error(error_code::invalid_argument,
                             "prompt of " + std::to_string(prompt.size()) + " tokens + max_new_tokens " +
                                 std::to_string(opt.max_new_tokens) + " exceed the model's context of " +
                                 std::to_string(context) + " tokens (max_position_embeddings)"));
  std::vector<model::generation_request> requests;
  for (std::size_t i = 0; i < prompts->size(); ++i)
    requests.push_back({i + 1, (*prompts)[i], opt.max_new_tokens, {opt.temperature, opt.top_k, opt.top_p, opt.seed}});
  model::generation_stats stats;
  auto out = model::generate(m, requests,
                             opt.recompute ? model::decode_mode::full_recompute : model::decode_mode::kv_cache,
                             &stats);
  if (!out)
    return fail(out.err());
  std::printf("model: %s\n       %s\n", loaded->description.c_str(), describe(m.config()).c_str());
  for (const auto& name : loaded->unexpected_tensors)
    std::printf("warning: tensor '%s' is not used by %s\n", name.c_str(), std::string{to_string(m.config().arch)}.c_str());
  std::printf("reference forward (no actors) on %s, %s; %s\n", m.backend().name().c_str(),
              opt.recompute ? "full recompute" : "KV cache", sampling_text(opt).c_str());
  print_generated(*prompts, *out);
  std::printf("prefill: %zu tokens in %.4f s (%.1f tokens/s)\n", stats.prompt_tokens, stats.prefill_seconds,
              stats.prompt_tokens / std::max(stats.prefill_seconds, 1e-9));
  std::printf("decode:  %zu tokens in %.4f s (%.1f tokens/s, batch %zu)\n", stats.decode_tokens,
              stats.decode_seconds, stats.decode_tokens / std::max(stats.decode_seconds, 1e-9), prompts->size());
  return 0;
}

int run_generate(const generate_options& opt) {
  if (opt.engine.reference)
    return run_generate_reference(opt);
  if (opt.recompute)
    return fail(make_error(error_code::invalid_argument, "--recompute needs --reference"));
  auto config = make_engine_config(opt.engine, opt.model_dir, opt.weight_seed);
  if (!config)
    return fail(config.err());
  auto engine = Engine::create(std::move(config.value()));
  if (!engine)
    return fail(engine.err());
  const model::model_config& c = (*engine)->model_config();
  auto prompts = collect_prompts(opt, c.vocab_size);
  if (!prompts)
    return fail(prompts.err());

  auto start = std::chrono::steady_clock::now();
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (std::size_t i = 0; i < prompts->size(); ++i) {
    Request request{i + 1, (*prompts)[i], opt.max_new_tokens, {opt.temperature, opt.top_k, opt.top_p, opt.seed}, false};
    request.ignore_eos = true;  // -n tokens, as the reference forward generates them
    streams.push_back((*engine)->submit(std::move(request)));
  }
  std::vector<std::vector<std::int32_t>> out;
  std::size_t generated = 0, prompt_tokens = 0;
  for (std::size_t i = 0; i < streams.size(); ++i) {
    auto tokens = streams[i]->wait();
    if (!tokens) {
      (*engine)->shutdown();  // every request ends (bounded retransmissions), then say what was injected
      (void)report_faults((*engine)->report(), opt.engine);
      return fail(tokens.err());
    }
    generated += tokens->size();
    prompt_tokens += (*prompts)[i].size();
    out.push_back(std::move(tokens.value()));
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  (*engine)->shutdown();

  std::printf("model: %s\n       %s\n",
              opt.model_dir.empty() ? "embedded default (configs/models/default-moe.json)" : opt.model_dir.c_str(),
              describe(c).c_str());
  std::printf("engine: %s; plan r1 %zu, r2 %zu, %s; "
              "scheduler %s; %s\n",
              opt.engine.cluster_file.empty() ? (*engine)->placement().c_str() : placement_text(opt.engine).c_str(),
              opt.engine.r1, opt.engine.r2, opt.engine.order.c_str(), opt.engine.scheduler.c_str(),
              sampling_text(opt).c_str());
  print_generated(*prompts, out);
  std::printf("throughput: %zu prompt + %zu generated tokens in %.4f s (%.1f generated tokens/s, batch %zu)\n",
              prompt_tokens, generated, seconds, double(generated) / std::max(seconds, 1e-9), prompts->size());
  print_report((*engine)->report());
  if (status faults = report_faults((*engine)->report(), opt.engine); !faults.ok())
    return fail(faults.err());
  status traced = write_trace(**engine, opt.engine);
  return traced.ok() ? 0 : fail(traced.err());
}

// -- eval ---------------------------------------------------------------------

struct eval_options {
  std::string model_dir;
  std::string prompts_file;
  std::size_t greedy = 8;
  std::string out_file;
  bool recompute = false;
  engine_options engine;
};

// What `eval` writes per prompt.
struct eval_result {
  std::vector<float> last_logits;
  std::vector<std::int32_t> argmax;
  std::vector<std::int32_t> greedy;
};

result<std::vector<eval_result>> eval_reference(const eval_options& opt, std::string& model_text) {
  auto backend = reference_backend(opt.engine);
  if (!backend)
    return backend.err();
  auto loaded = load_model(opt.model_dir, 1, reference_threads(opt.engine), *backend);
  if (!loaded)
    return loaded.err();
  model::reference_model& m = *loaded->model;
  model_text = loaded->description + " (reference forward)";
  std::size_t vocab = std::size_t(m.config().vocab_size);
  auto prompts = load_prompts(opt.prompts_file, m.config().vocab_size);
  if (!prompts)
    return prompts.err();
  // Every prompt position in one batch (batch invariance makes this equal to one at a time).
  std::vector<model::kv_cache> caches(prompts->size(), model::kv_cache{m.config()});
  std::vector<model::forward_segment> segments;
  for (std::size_t i = 0; i < prompts->size(); ++i)
    segments.push_back({&caches[i], (*prompts)[i]});
  auto logits = m.forward(segments, model::logits_for::every_token);
  if (!logits)
    return logits.err();
  std::vector<model::generation_request> requests;
  for (std::size_t i = 0; i < prompts->size(); ++i)
    requests.push_back({i + 1, (*prompts)[i], opt.greedy, {}});
  auto greedy = model::generate(m, requests,
                                opt.recompute ? model::decode_mode::full_recompute : model::decode_mode::kv_cache);
  if (!greedy)
    return greedy.err();
  std::vector<eval_result> out(prompts->size());
  std::size_t row = 0;
  for (std::size_t i = 0; i < prompts->size(); ++i) {
    for (std::size_t j = 0; j < (*prompts)[i].size(); ++j, ++row)
      out[i].argmax.push_back(model::argmax({logits->data() + row * vocab, vocab}));
    out[i].last_logits.assign(logits->data() + (row - 1) * vocab, logits->data() + row * vocab);
    out[i].greedy = (*greedy)[i];
  }
  return out;
}

result<std::vector<eval_result>> eval_engine(const eval_options& opt, std::string& model_text) {
  if (opt.recompute)
    return make_error(error_code::invalid_argument, "--recompute needs --reference");
  auto config = make_engine_config(opt.engine, opt.model_dir, 1);
  if (!config)
    return config.err();
  auto engine = Engine::create(std::move(config.value()));
  if (!engine)
    return engine.err();
  model_text = "checkpoint " + opt.model_dir + " (engine: " +
               (opt.engine.cluster_file.empty() ? (*engine)->placement() : placement_text(opt.engine)) + ")";
  std::size_t vocab = std::size_t((*engine)->model_config().vocab_size);
  auto prompts = load_prompts(opt.prompts_file, (*engine)->model_config().vocab_size);
  if (!prompts)
    return prompts.err();
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (std::size_t i = 0; i < prompts->size(); ++i) {
    Request request{i + 1, (*prompts)[i], std::max<std::size_t>(1, opt.greedy), {}, false};
    request.return_prompt_logits = true;
    request.ignore_eos = true;  // --greedy N tokens, compared with Hugging Face's
    streams.push_back((*engine)->submit(std::move(request)));
  }
  std::vector<eval_result> out(prompts->size());
  for (std::size_t i = 0; i < streams.size(); ++i) {
    while (auto event = streams[i]->next()) {
      if (!event->error.empty()) {
        (*engine)->shutdown();  // every request ends (bounded retransmissions), then say what was injected
        (void)report_faults((*engine)->report(), opt.engine);
        return make_error(error_code::invalid_argument, event->error);
      }
      if (!event->prompt_logits.empty()) {
        for (std::size_t row = 0; row < (*prompts)[i].size(); ++row)
          out[i].argmax.push_back(model::argmax({event->prompt_logits.data() + row * vocab, vocab}));
        out[i].last_logits.assign(event->prompt_logits.end() - std::ptrdiff_t(vocab), event->prompt_logits.end());
      }
      if (out[i].greedy.size() < opt.greedy)
        out[i].greedy.push_back(event->token);
    }
  }
  (*engine)->shutdown();
  MOERT_TRY(report_faults((*engine)->report(), opt.engine));
  return out;
}

int run_eval(const eval_options& opt) {
  std::string model_text;
  auto results = opt.engine.reference ? eval_reference(opt, model_text) : eval_engine(opt, model_text);
  if (!results)
    return fail(results.err());
  nlohmann::json out;
  out["model"] = model_text;
  out["prompts"] = nlohmann::json::array();
  for (const eval_result& r : *results)
    out["prompts"].push_back({{"last_logits", r.last_logits}, {"argmax", r.argmax}, {"greedy", r.greedy}});
  std::ofstream file{opt.out_file};
  if (!file)
    return fail(make_error(error_code::io_error, "cannot write '" + opt.out_file + "'"));
  file << out.dump() << "\n";
  if (!file.flush())
    return fail(make_error(error_code::io_error, "writing '" + opt.out_file + "' failed"));
  std::printf("wrote %zu prompts to %s\n", results->size(), opt.out_file.c_str());
  return 0;
}

// -- inspect ------------------------------------------------------------------

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 4) {
    bytes /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f %s", bytes, units[u]);
  return buf;
}

int run_inspect(const std::string& model_dir) {
  model::model_config c;
  std::string source;
  std::map<std::string, std::pair<std::size_t, std::size_t>> stored;  // dtype -> tensors, bytes
  if (model_dir.empty()) {
    auto parsed = model::parse_config(default_model_json(), "embedded default model");
    if (!parsed)
      return fail(parsed.err());
    c = *parsed;
    source = "embedded default (configs/models/default-moe.json, synthetic weights)";
  } else {
    auto parsed = model::load_config(model_dir);
    if (!parsed)
      return fail(parsed.err());
    c = *parsed;
    auto ckpt = model::checkpoint::open(model_dir);
    if (!ckpt)
      return fail(ckpt.err());
    for (const auto& [name, view] : ckpt->tensors()) {
      auto& slot = stored[std::string{safetensors_name(view.type)}];
      ++slot.first;
      slot.second += view.num_bytes;
    }
    source = "checkpoint " + model_dir;
  }
  auto p = model::count_parameters(c);
  std::printf("model:        %s\n", source.c_str());
  std::printf("architecture: %s\n", describe(c).c_str());
  std::size_t num_sparse = 0;
  for (bool s : c.sparse_layers)
    num_sparse += s;
  std::printf("layers:       %zu MoE, %zu dense; expert intermediate %lld, dense intermediate %lld",
              num_sparse, c.sparse_layers.size() - num_sparse, (long long)c.moe_intermediate_size,
              (long long)c.intermediate_size);
  if (c.shared_expert_intermediate_size)
    std::printf(", shared expert %lld", (long long)c.shared_expert_intermediate_size);
  std::printf("\nrouting:      softmax top-%lld, %s\n", (long long)c.num_experts_per_tok,
              c.norm_topk_prob ? "renormalised" : "not renormalised");
  std::printf("\n%-16s %16s %14s\n", "component", "parameters", "f32 memory");
  auto line = [](const char* name, std::int64_t count) {
    std::printf("%-16s %16lld %14s\n", name, (long long)count, human_bytes(double(count) * 4).c_str());
  };
  line("embedding", p.embedding);
  line("attention", p.attention);
  line("norms", p.norms);
  line("router", p.router);
  line("routed experts", p.routed_experts);
  line("shared experts", p.shared_experts);
  line("dense mlp", p.dense_mlp);
  line(c.tie_word_embeddings ? "lm_head (tied)" : "lm_head", p.lm_head);
  line("total", p.total());
  line("active/token", p.active_per_token(c));
  for (const auto& [type, slot] : stored)
    std::printf("stored %-9s %16zu tensors %s\n", type.c_str(), slot.first, human_bytes(double(slot.second)).c_str());
  if (!model_dir.empty()) {
    // What the loader holds: 16-bit matrices stay 16-bit; vectors, embedding and router are f32.
    auto loaded = model::load_checkpoint(model_dir);
    if (!loaded)
      return fail(loaded.err());
    model::weight_bytes held = model::resident_bytes(loaded->weights);
    std::printf("resident weights %s (f32 %s, bf16 %s, f16 %s)\n", human_bytes(double(held.total())).c_str(),
                human_bytes(double(held.f32)).c_str(), human_bytes(double(held.bf16)).c_str(),
                human_bytes(double(held.f16)).c_str());
  }
  std::int64_t kv = c.kv_bytes_per_token_per_layer();
  std::printf("\nKV cache (f32): %lld bytes per token per layer, %s per token, %s per 4096-token sequence\n",
              (long long)kv, human_bytes(double(kv * c.num_layers)).c_str(),
              human_bytes(double(kv * c.num_layers * 4096)).c_str());
  if (c.mla())
    std::printf("  MLA, kept compressed: kv_lora_rank %lld + qk_rope_head_dim %lld floats per token per layer "
                "(expanded per-head K/V would take %lld bytes)\n",
                (long long)c.kv_lora_rank, (long long)c.qk_rope_head_dim,
                (long long)(c.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * 4));
  return 0;
}

}  // namespace

command_runner add_generate_command(CLI::App& app) {
  auto opt = std::make_shared<generate_options>();
  CLI::App* sub = app.add_subcommand("generate", "Generate tokens (embedded default model unless --model)");
  sub->add_option("--model", opt->model_dir, "Hugging Face checkpoint directory");
  sub->add_option("--prompt", opt->prompts, "Prompt token ids, e.g. \"1,2,3\" (repeatable)");
  sub->add_option("--prompts", opt->prompts_file, "JSON file: list of token-id lists");
  sub->add_option("--batch", opt->batch, "Random prompts when none given")->check(CLI::Range(1, 4096));
  sub->add_option("--prompt-length", opt->prompt_length, "Length of random prompts")->check(CLI::Range(1, 1 << 20));
  sub->add_option("--max-new-tokens,-n", opt->max_new_tokens, "Tokens to generate per prompt");
  sub->add_option("--temperature", opt->temperature, "0 = greedy")->check(CLI::Range(0.0f, 100.0f));
  sub->add_option("--top-k", opt->top_k, "0 = off")->check(CLI::Range(0, 1 << 30));
  sub->add_option("--top-p", opt->top_p, "1 = off")->check(CLI::Range(0.0f, 1.0f));
  sub->add_option("--seed", opt->seed, "Sampling seed (and random prompts)");
  sub->add_option("--weight-seed", opt->weight_seed, "Seed of the embedded default's weights");
  sub->add_flag("--recompute", opt->recompute, "With --reference: re-run the whole sequence per token");
  add_engine_options(*sub, opt->engine);
  return [opt] { return run_generate(*opt); };
}

command_runner add_eval_command(CLI::App& app) {
  auto opt = std::make_shared<eval_options>();
  CLI::App* sub = app.add_subcommand("eval", "Logits, argmax and greedy continuation per prompt, as JSON");
  sub->add_option("--model", opt->model_dir, "Hugging Face checkpoint directory")->required();
  sub->add_option("--prompts", opt->prompts_file, "JSON file: list of token-id lists")->required();
  sub->add_option("--greedy", opt->greedy, "Greedy tokens to generate per prompt");
  sub->add_option("--out", opt->out_file, "Output JSON file")->required();
  sub->add_flag("--recompute", opt->recompute, "With --reference: greedy by full recompute, no KV cache");
  add_engine_options(*sub, opt->engine);
  return [opt] { return run_eval(*opt); };
}

command_runner add_inspect_command(CLI::App& app) {
  auto dir = std::make_shared<std::string>();
  CLI::App* sub = app.add_subcommand("inspect", "Architecture, parameter count and memory by component");
  sub->add_option("--model", *dir, "Hugging Face checkpoint directory (default: embedded model)");
  return [dir] { return run_inspect(*dir); };
}

}  // namespace moert::cli
