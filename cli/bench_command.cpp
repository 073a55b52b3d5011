#include "bench_command.hpp"

#include "core/rng.hpp"
#include "actors/runtime.hpp"
#include "engine/engine.hpp"
#include "engine_options.hpp"
#include "gpu/cpu/backend.hpp"
#include "gpu/cpu/gemm.hpp"
#include "policy/findep.hpp"
#include "policy/replan.hpp"
#include "model_source.hpp"
#include "policy_commands.hpp"
#include "model/forward.hpp"
#include "model/layers.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace moert::cli {

namespace {

struct bench_options {
  std::string model_type = "qwen3_moe";  // or deepseek_v2: MLA, YaRN, group-limited routing
  std::size_t layers = 8, hidden = 1024, heads = 16, kv_heads = 4, head_dim = 64;
  std::size_t experts = 32, top_k = 4, expert_intermediate = 512, vocab = 4096;
  std::size_t decode_batch = 64, decode_steps = 8;
  std::size_t prefill_tokens = 256, prefill_sequences = 8;
  std::size_t reps = 3;
  std::size_t findep_r1 = 2, findep_r2 = 2;
  std::string findep_order = "ASAS";
  std::size_t pppipe_r1 = 2;
  std::string json_file;
  // Embedded bench: one more run of each engine configuration with the trace on, not timed,
  // written to this folder as <workload>-<configuration>.json (the timed runs stay untraced).
  std::string trace_dir;
  std::string only_workload;  // embedded bench: "decode" or "prefill" only; empty: both
  // Reproduction 4 of issue [C]: FinDEP ÷ PPPipe measured vs predicted on a shared-expert model.
  std::string findep_check_testbed;
  std::size_t check_sequences = 8, check_seq_len = 64;
  // --model: llama-bench's three figures on a checkpoint.
  std::string model_dir;
  std::size_t pp_tokens = 256, tg_tokens = 64, tg_batch = 16, tg_prompt = 16, reference_threads = 2;
  // With --model: the engine on `moert node` processes instead of in this process.
  std::string cluster_file, secret_file;
  std::string faults_file;  // with --model: the engine runs under this fault plan
  std::string backend = "cpu";  // the engine's devices (the reference forward stays on cpu)
  gpu::backend_kind backend_kind = gpu::backend_kind::cpu;
};

struct workload {
  const char* name;
  std::vector<Request> requests;
  std::size_t tokens;  // the tokens the figure counts (generated or prompt)
};

struct sample {
  double tokens_per_s;
  EngineReport report;
  double lifetime_s = 0;  // Engine::create → report(): what the report's busy fractions divide
};

struct figure {
  double median = 0, low = 0, high = 0;
  EngineReport report;  // of the median run
  double lifetime_s = 0;
};

figure summarize(std::vector<sample> runs) {
  std::sort(runs.begin(), runs.end(), [](const sample& a, const sample& b) { return a.tokens_per_s < b.tokens_per_s; });
  const sample& mid = runs[runs.size() / 2];
  return {mid.tokens_per_s, runs.front().tokens_per_s, runs.back().tokens_per_s, mid.report, mid.lifetime_s};
}

std::string config_json(const bench_options& o) {
  if (o.model_type == "deepseek_v2") {
    // DeepSeek-V2 proportions at mid size: MLA with a latent of hidden/4, one leading dense
    // layer, two shared experts, group-limited routing and YaRN.
    nlohmann::json c = {{"model_type", "deepseek_v2"},
                        {"vocab_size", o.vocab},
                        {"hidden_size", o.hidden},
                        {"num_hidden_layers", o.layers},
                        {"num_attention_heads", o.heads},
                        {"num_key_value_heads", o.heads},
                        {"q_lora_rank", o.hidden * 3 / 8},
                        {"kv_lora_rank", o.hidden / 4},
                        {"qk_nope_head_dim", o.head_dim},
                        {"qk_rope_head_dim", o.head_dim / 2},
                        {"v_head_dim", o.head_dim},
                        {"n_routed_experts", o.experts},
                        {"n_shared_experts", 2},
                        {"num_experts_per_tok", o.top_k},
                        {"moe_intermediate_size", o.expert_intermediate},
                        {"intermediate_size", 4 * o.expert_intermediate},
                        {"first_k_dense_replace", 1},
                        {"moe_layer_freq", 1},
                        {"topk_method", "group_limited_greedy"},
                        {"n_group", 4},
                        {"topk_group", 2},
                        {"norm_topk_prob", false},
                        {"routed_scaling_factor", 1.0},
                        {"rope_theta", 10000.0},
                        {"rope_scaling",
                         {{"type", "yarn"},
                          {"factor", 4},
                          {"original_max_position_embeddings", 4096},
                          {"beta_fast", 32},
                          {"beta_slow", 1},
                          {"mscale", 0.707},
                          {"mscale_all_dim", 0.707}}}};
    return c.dump();
  }
  nlohmann::json c = {{"model_type", "qwen3_moe"},      {"vocab_size", o.vocab},
                      {"hidden_size", o.hidden},        {"num_hidden_layers", o.layers},
                      {"num_attention_heads", o.heads}, {"num_key_value_heads", o.kv_heads},
                      {"head_dim", o.head_dim},         {"num_experts", o.experts},
                      {"num_experts_per_tok", o.top_k}, {"moe_intermediate_size", o.expert_intermediate},
                      {"norm_topk_prob", true}};
  return c.dump();
}

std::vector<workload> workloads(const bench_options& o) {
  rng gen{7};
  auto random_prompt = [&](std::size_t length) {
    std::vector<std::int32_t> p(length);
    for (auto& t : p)
      t = std::int32_t(gen.next_u64() % o.vocab);
    return p;
  };
  workload decode{"decode", {}, o.decode_batch * o.decode_steps};
  for (std::size_t i = 0; i < o.decode_batch; ++i)  // one-token prompts: every step is a decode step
    decode.requests.push_back({i + 1, random_prompt(1), o.decode_steps, {}, false});
  workload prefill{"prefill", {}, o.prefill_tokens};
  for (std::size_t i = 0; i < o.prefill_sequences; ++i)
    prefill.requests.push_back({i + 1, random_prompt(o.prefill_tokens / o.prefill_sequences), 1, {}, false});
  return {decode, prefill};
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

sample run_reference(model::reference_model& m, const workload& w) {
  std::vector<model::generation_request> requests;
  for (const Request& r : w.requests)
    requests.push_back({r.id, r.prompt, r.max_new_tokens, r.sampling});
  auto start = std::chrono::steady_clock::now();
  auto out = model::generate(m, requests, model::decode_mode::kv_cache);
  double s = seconds_since(start);
  if (!out)
    throw std::runtime_error(out.err().what());
  return {double(w.tokens) / s, {}, 0.0};
}

sample run_engine(const EngineConfig& config, const workload& w, std::string trace_file = {}) {
  EngineConfig traced = config;
  traced.trace = !trace_file.empty();
  auto created = std::chrono::steady_clock::now();
  auto engine = Engine::create(traced);
  if (!engine)
    throw std::runtime_error(engine.err().what());
  auto start = std::chrono::steady_clock::now();
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (const Request& r : w.requests)
    streams.push_back((*engine)->submit(r));
  for (auto& s : streams)
    if (auto out = s->wait(); !out)
      throw std::runtime_error(out.err().what());
  double s = seconds_since(start);
  EngineReport report = (*engine)->report();
  double lifetime = seconds_since(created);
  if (!trace_file.empty())
    if (status written = write_trace_file(**engine, trace_file); !written.ok())
      throw std::runtime_error(written.err().what());
  (*engine)->shutdown();
  return {double(w.tokens) / s, report, lifetime};
}

// The median time of one expert_step on `rows` rows over every (layer, expert), one thread,
// each expert after the others (weights from memory, as a decode step streams them).
struct expert_cost {
  double median_us = 0;
  std::size_t count = 0;
};

expert_cost time_experts(const model::model_weights& weights, const model::model_config& config, std::size_t rows) {
  cpu::cpu_backend one{1};
  std::size_t hidden = std::size_t(config.hidden_size);
  std::vector<float> in(rows * hidden), out(rows * hidden);
  rng gen{3};
  for (float& x : in)
    x = float(gen.next_u64() % 2001) / 1000.0f - 1.0f;
  std::vector<double> times;
  for (std::int64_t layer = 0; layer < config.num_layers; ++layer) {
    if (std::size_t(layer) < config.sparse_layers.size() && !config.sparse_layers[std::size_t(layer)])
      continue;
    for (std::int64_t e = 0; e < config.num_experts; ++e) {
      auto start = std::chrono::steady_clock::now();
      model::expert_step(weights, std::size_t(layer), std::size_t(e), in.data(), rows, out.data(), one);
      times.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
    }
  }
  if (times.empty())
    return {};
  std::nth_element(times.begin(), times.begin() + std::ptrdiff_t(times.size() / 2), times.end());
  return {times[times.size() / 2], times.size()};
}

double busy(const EngineReport& r, const std::string& prefix) {
  double total = 0;
  for (const auto& d : r.devices)
    if (d.name.rfind(prefix, 0) == 0)
      total += d.busy_fraction;
  return total;
}

// FinDEP's plan and the best PPPipe plan, both solved from the calibrated testbed, run on one
// attention core + one expert core with a qwen2_moe-style model (shared expert), prefill-style
// as the cost model assumes. Prints measured and predicted FinDEP ÷ PPPipe.
int run_findep_check(const bench_options& o) {
  auto bed = load_testbed(o.findep_check_testbed);
  if (!bed) {
    std::fprintf(stderr, "moert: error: %s\n", bed.err().what().c_str());
    return 1;
  }
  nlohmann::json c = {{"model_type", "qwen2_moe"},      {"vocab_size", o.vocab},
                      {"hidden_size", o.hidden},        {"num_hidden_layers", o.layers},
                      {"num_attention_heads", o.heads}, {"num_key_value_heads", o.kv_heads},
                      {"head_dim", o.head_dim},         {"num_experts", o.experts},
                      {"num_experts_per_tok", o.top_k}, {"moe_intermediate_size", o.expert_intermediate},
                      {"shared_expert_intermediate_size", 4 * o.expert_intermediate}};
  auto config = model::parse_config(c.dump(), "findep check model");
  if (!config) {
    std::fprintf(stderr, "moert: error: %s\n", config.err().what().c_str());
    return 1;
  }
  auto instance = policy::make_instance(Engine::shape_of(*config), *bed, 1, 1, o.check_seq_len,
                                        std::size_t(config->num_layers), o.check_sequences);
  auto findep = instance ? policy::solve(*instance) : result<policy::plan>{instance.err()};
  auto pppipe = instance ? policy::solve_pppipe(*instance) : result<policy::plan>{instance.err()};
  if (!findep || !pppipe) {
    std::fprintf(stderr, "moert: error: %s\n", (!findep ? findep.err() : pppipe.err()).what().c_str());
    return 1;
  }
  std::printf("# FinDEP vs PPPipe on the CPU runtime (reproduction 4 of issue [C]): qwen2_moe-style, %zu layers, "
              "hidden %zu, %zu experts top-%zu + shared expert %zu; %zu sequences x %zu tokens (prefill); testbed %s\n",
              o.layers, o.hidden, o.experts, o.top_k, 4 * o.expert_intermediate, o.check_sequences, o.check_seq_len,
              bed->name.c_str());
  std::printf("# reproduce: moert bench --findep-check %s --layers %zu --hidden %zu --experts %zu --top-k %zu "
              "--check-sequences %zu --check-seq-len %zu --reps %zu\n",
              o.findep_check_testbed.c_str(), o.layers, o.hidden, o.experts, o.top_k, o.check_sequences,
              o.check_seq_len, o.reps);
  auto weights = std::make_shared<const model::model_weights>(model::synthetic_weights(*config, 1));
  rng gen{11};
  workload w{"prefill", {}, o.check_sequences * o.check_seq_len};
  for (std::size_t i = 0; i < o.check_sequences; ++i) {
    std::vector<std::int32_t> prompt(o.check_seq_len);
    for (auto& t : prompt)
      t = std::int32_t(gen.next_u64() % o.vocab);
    w.requests.push_back({i + 1, prompt, 1, {}, false});
  }
  auto measure = [&](const policy::plan& p) {
    EngineConfig e;
    e.weights = weights;
    e.weights_config = *config;
    e.backend = o.backend_kind;
    e.actor_threads = 1;
    e.plan = policy::to_execution_plan(p);
    std::vector<sample> runs;
    for (std::size_t r = 0; r < o.reps; ++r)
      runs.push_back(run_engine(e, w));
    return summarize(std::move(runs));
  };
  figure f = measure(*findep), pp = measure(*pppipe);
  auto describe_plan = [](const policy::plan& p) {
    return "m_a " + std::to_string(p.m_a) + ", r1 " + std::to_string(p.r1) + ", r2 " +
           std::to_string(p.pppipe ? 1 : p.r2) + ", " + std::string{policy::to_string(p.order)} +
           (p.pppipe ? " (PPPipe)" : "");
  };
  std::printf("| plan                               | measured tokens/s        | predicted tokens/s |\n");
  std::printf("|------------------------------------|--------------------------|--------------------|\n");
  std::printf("| FinDEP %-27s | %8.1f (%6.1f-%7.1f) | %18.1f |\n", describe_plan(*findep).c_str(), f.median, f.low,
              f.high, findep->throughput);
  std::printf("| PPPipe %-27s | %8.1f (%6.1f-%7.1f) | %18.1f |\n", describe_plan(*pppipe).c_str(), pp.median, pp.low,
              pp.high, pppipe->throughput);
  double measured = f.median / pp.median, predicted = findep->throughput / pppipe->throughput;
  std::printf("FinDEP / PPPipe: measured %.3f, predicted %.3f, difference %.1f %% (goal: within 10 %%)\n", measured,
              predicted, 100.0 * (measured - predicted) / predicted);
  return 0;
}

// -- moert bench --model: llama-bench's figures on a checkpoint --------------------------

// One run's figures; a figure a run does not measure is 0.
struct llama_figures {
  double prompt = 0;  // prompt tokens/s of one pp_tokens-long prompt
  double decode = 0;  // generated tokens/s once every sequence has its first token
};

std::vector<std::vector<std::int32_t>> random_prompts(std::size_t count, std::size_t length, std::int64_t vocab,
                                                      std::uint64_t seed) {
  rng gen{seed};
  std::vector<std::vector<std::int32_t>> prompts(count, std::vector<std::int32_t>(length));
  for (auto& p : prompts)
    for (auto& t : p)
      t = std::int32_t(gen.next_u64() % std::uint64_t(vocab));
  return prompts;
}

// The reference forward's own step timings: the first step is the prefill of every prompt,
// each later step one decode token per sequence.
llama_figures reference_run(model::reference_model& m, const std::vector<std::vector<std::int32_t>>& prompts,
                            std::size_t new_tokens) {
  std::vector<model::generation_request> requests;
  for (std::size_t i = 0; i < prompts.size(); ++i)
    requests.push_back({i + 1, prompts[i], new_tokens, {}});
  model::generation_stats stats;
  auto out = model::generate(m, requests, model::decode_mode::kv_cache, &stats);
  if (!out)
    throw std::runtime_error(out.err().what());
  return {double(stats.prompt_tokens) / std::max(stats.prefill_seconds, 1e-9),
          stats.decode_tokens == 0 ? 0.0 : double(stats.decode_tokens) / std::max(stats.decode_seconds, 1e-9)};
}

// The engine timed by when its tokens arrive: prompt rate = prompt tokens ÷ (submit → last
// first token); decode rate = tokens that arrive after every sequence has its first token ÷
// the time from then to the last token. Engine start-up is not counted.
// With a fault plan, each run's fault counts (the nodes' too, asked before shutdown while they
// still hold them) are added to `faults`.
llama_figures engine_run(const EngineConfig& config, const std::vector<std::vector<std::int32_t>>& prompts,
                         std::size_t new_tokens, EngineReport* faults = nullptr) {
  using clock = std::chrono::steady_clock;
  auto engine = Engine::create(config);
  if (!engine)
    throw std::runtime_error(engine.err().what());
  std::mutex mutex;
  std::vector<std::vector<clock::time_point>> arrivals(prompts.size());
  const auto start = clock::now();
  std::vector<std::shared_ptr<TokenStream>> streams;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    Request r;
    r.prompt = prompts[i];
    r.max_new_tokens = new_tokens;
    r.ignore_eos = true;  // exactly new_tokens each, like llama-bench
    streams.push_back((*engine)->submit(std::move(r), [&mutex, &arrivals, i](const TokenEvent& event) {
      if (event.token < 0)
        return;
      auto now = clock::now();
      std::lock_guard lock{mutex};
      arrivals[i].push_back(now);
    }));
  }
  for (auto& s : streams)
    if (auto out = s->wait(); !out)
      throw std::runtime_error(out.err().what());
  if (faults && config.faults) {
    faults->faults_enabled = true;
    faults->faults += (*engine)->report().faults;
  }
  (*engine)->shutdown();
  std::size_t prompt_tokens = 0;
  clock::time_point all_first = start, end = start;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    if (arrivals[i].empty())
      throw std::runtime_error("bench: a request ended without tokens");
    prompt_tokens += prompts[i].size();
    all_first = std::max(all_first, arrivals[i].front());
    end = std::max(end, arrivals[i].back());
  }
  std::size_t decoded = 0;
  for (const auto& times : arrivals)
    decoded += std::size_t(std::count_if(times.begin(), times.end(), [&](auto t) { return t > all_first; }));
  auto seconds = [](auto d) { return std::chrono::duration<double>(d).count(); };
  return {double(prompt_tokens) / std::max(seconds(all_first - start), 1e-9),
          decoded == 0 ? 0.0 : double(decoded) / std::max(seconds(end - all_first), 1e-9)};
}

figure summarize_values(std::vector<double> values) {
  std::vector<sample> runs;
  for (double v : values)
    runs.push_back({v, {}});
  return summarize(std::move(runs));
}

int run_model_bench(const bench_options& o) {
  std::error_code ec;
  std::uintmax_t file_bytes = 0;
  for (const auto& entry : std::filesystem::directory_iterator(o.model_dir, ec))
    if (entry.path().extension() == ".safetensors")
      file_bytes += entry.file_size(ec);
  auto load_start = std::chrono::steady_clock::now();
  auto loaded = model::load_checkpoint(o.model_dir);
  if (!loaded) {
    std::fprintf(stderr, "moert: error: %s\n", loaded.err().what().c_str());
    return 1;
  }
  double load_s = seconds_since(load_start);
  const model::model_config config = loaded->config;
  model::weight_bytes held = model::resident_bytes(loaded->weights);
  auto weights = std::make_shared<const model::model_weights>(std::move(loaded->weights));

  // The engine's default: what `moert generate --model DIR` runs without placement flags (or
  // with --cluster: the same on the cluster's nodes, which load the checkpoint themselves).
  engine_options placement;
  placement.cluster_file = o.cluster_file;
  placement.secret_file = o.secret_file;
  placement.faults_file = o.faults_file;
  // --backend: the reference forward's and the engine's devices' backend. Off the cpu backend
  // each device loads its own part of the checkpoint (the host copy cannot be shared).
  bool on_device = o.backend_kind != gpu::backend_kind::cpu;
  auto defaults = make_engine_config(placement, o.cluster_file.empty() && !on_device ? "" : o.model_dir, 1);
  if (!defaults) {
    std::fprintf(stderr, "moert: error: %s\n", defaults.err().what().c_str());
    return 1;
  }
  EngineConfig engine_config = std::move(defaults.value());
  engine_config.backend = o.backend_kind;
  if (!engine_config.cluster && !on_device) {
    engine_config.weights = weights;
    engine_config.weights_config = config;
  }

  auto mib = [](double bytes) { return bytes / double(1 << 20); };
  std::printf("# moert bench --model %s: %s, %lld layers, hidden %lld, %lld experts top-%lld, vocab %lld\n",
              o.model_dir.c_str(), std::string{to_string(config.arch)}.c_str(), (long long)config.num_layers,
              (long long)config.hidden_size, (long long)config.num_experts, (long long)config.num_experts_per_tok,
              (long long)config.vocab_size);
  std::printf("# weights: %.1f MiB of safetensors; held %.1f MiB (f32 %.1f, bf16 %.1f, f16 %.1f); loaded in %.2f s; "
              "matmul kernel %s\n",
              mib(double(file_bytes)), mib(double(held.total())), mib(double(held.f32)), mib(double(held.bf16)),
              mib(double(held.f16)), load_s, cpu::matmul_kernel_name());
  std::printf("# figures (llama-bench's): prompt %zu = one %zu-token prompt, prompt tokens/s; decode at 1 and at %zu "
              "sequences = %zu new tokens after a %zu-token prompt each, tokens/s once every sequence has its first "
              "token; median (min-max) of %zu runs; each figure's engine and reference runs in pairs, back to back\n",
              o.pp_tokens, o.pp_tokens, o.tg_batch, o.tg_tokens, o.tg_prompt, o.reps);
  // What Engine::create will choose, to print it (create resolves it again, the same way).
  EngineConfig resolved = engine_config;
  auto placed = Engine::resolve_placement(resolved, config);
  if (!placed) {
    std::fprintf(stderr, "moert: error: %s\n", placed.err().what().c_str());
    return 1;
  }
  std::printf("# engine default: %s%zu attention + %zu expert devices, %zu threads each, plan r1 %zu r2 %zu %s, "
              "scheduler %s; reference forward: %zu threads\n",
              resolved.single_device ? "one device (attention and experts) = " : "", resolved.attention_devices,
              resolved.expert_devices, resolved.threads_per_device, resolved.plan.r1, resolved.plan.r2,
              std::string{policy::to_string(resolved.plan.order)}.c_str(),
              std::string{to_string(resolved.scheduler)}.c_str(), o.reference_threads);
  if (!placed->empty())
    std::printf("# placement: %s\n", placed->c_str());
  std::printf("# reproduce: moert bench --model %s --reps %zu --pp %zu --tg %zu --tg-batch %zu --tg-prompt %zu "
              "--reference-threads %zu\n",
              o.model_dir.c_str(), o.reps, o.pp_tokens, o.tg_tokens, o.tg_batch, o.tg_prompt, o.reference_threads);
  std::fflush(stdout);

  loaded_model device_reference;  // --backend cuda: the reference forward on the GPU
  std::unique_ptr<model::reference_model> host_reference;
  if (o.backend_kind != gpu::backend_kind::cpu) {
    auto on_device = load_model(o.model_dir, 1, o.reference_threads, o.backend_kind);
    if (!on_device) {
      std::fprintf(stderr, "moert: error: %s\n", on_device.err().what().c_str());
      return 1;
    }
    device_reference = std::move(*on_device);
  } else {
    host_reference = std::make_unique<model::reference_model>(config, weights, o.reference_threads);
  }
  model::reference_model& reference = device_reference.model ? *device_reference.model : *host_reference;
  auto pp_prompt = random_prompts(1, o.pp_tokens, config.vocab_size, 1);
  auto tg1_prompts = random_prompts(1, o.tg_prompt, config.vocab_size, 2);
  auto tgn_prompts = random_prompts(o.tg_batch, o.tg_prompt, config.vocab_size, 3);
  // [mode][figure]: mode 0 reference, 1 engine; figure 0 prompt, 1 decode at 1, 2 decode at tg_batch.
  std::vector<double> runs[2][3];
  // Each figure's engine and reference runs are timed back to back, so a loaded moment on a
  // shared machine hits both runs of a pair: the median of the pairs' ratios is steadier than
  // the ratio of the medians. Odd repetitions run the engine first, so neither mode always
  // runs in the other's wake.
  std::vector<double> pair_ratios[3];
  EngineReport fault_totals;  // with --faults: summed over the engine's runs
  for (std::size_t r = 0; r < o.reps; ++r)
    for (int k = 0; k < 3; ++k) {
      double pair[2] = {0, 0};
      for (int i = 0; i < 2; ++i) {
        int mode = r % 2 == 0 ? i : 1 - i;
        auto run = [&](const std::vector<std::vector<std::int32_t>>& prompts, std::size_t n) {
          return mode == 0 ? reference_run(reference, prompts, n)
                           : engine_run(engine_config, prompts, n, &fault_totals);
        };
        pair[mode] = k == 0   ? run(pp_prompt, 1).prompt
                     : k == 1 ? run(tg1_prompts, o.tg_tokens + 1).decode
                              : run(tgn_prompts, o.tg_tokens + 1).decode;
        runs[mode][k].push_back(pair[mode]);
      }
      pair_ratios[k].push_back(pair[1] / std::max(pair[0], 1e-9));
    }

  const char* names[2] = {"reference forward", "engine, default placement"};
  char heads[3][48];
  std::snprintf(heads[0], sizeof heads[0], "prompt %zu", o.pp_tokens);
  std::snprintf(heads[1], sizeof heads[1], "decode, 1 sequence");
  std::snprintf(heads[2], sizeof heads[2], "decode, %zu sequences", o.tg_batch);
  std::printf("\n| %-36s | %-26s | %-26s | %-26s |\n", "tokens/s", heads[0], heads[1], heads[2]);
  std::printf("|--------------------------------------|----------------------------|----------------------------|"
              "----------------------------|\n");
  figure f[2][3];
  nlohmann::json json_rows = nlohmann::json::array();
  for (int mode = 0; mode < 2; ++mode) {
    std::string name = std::string{names[mode]} +
                       (mode != 0 ? std::string{}
                        : o.backend_kind != gpu::backend_kind::cpu ? ", " + reference.backend().name()
                                                                    : ", " + std::to_string(o.reference_threads) + " threads");
    std::printf("| %-36s |", name.c_str());
    for (int k = 0; k < 3; ++k) {
      f[mode][k] = summarize_values(runs[mode][k]);
      std::printf(" %8.1f (%7.1f-%7.1f) |", f[mode][k].median, f[mode][k].low, f[mode][k].high);
      json_rows.push_back({{"configuration", name}, {"figure", heads[k]}, {"tokens_per_s", f[mode][k].median},
                           {"min", f[mode][k].low}, {"max", f[mode][k].high}});
    }
    std::printf("\n");
  }
  std::printf("| %-36s |", "engine / reference (goal >= 0.95)");
  for (int k = 0; k < 3; ++k)
    std::printf(" %26.3f |", f[1][k].median / std::max(f[0][k].median, 1e-9));
  std::printf("\n| %-36s |", "median of per-pair ratios");
  for (int k = 0; k < 3; ++k) {
    figure ratio = summarize_values(pair_ratios[k]);
    std::printf(" %8.3f (%7.3f-%7.3f) |", ratio.median, ratio.low, ratio.high);
    json_rows.push_back({{"configuration", "engine / reference, per pair"}, {"figure", heads[k]},
                         {"ratio", ratio.median}, {"min", ratio.low}, {"max", ratio.high}});
  }
  std::printf("\n");
  if (!o.faults_file.empty()) {  // by type, over all of the engine's runs
    std::printf("\n%zu engine runs under the fault plan; ", 3 * o.reps);
    if (status printed = report_faults(fault_totals, placement); !printed.ok())
      std::fprintf(stderr, "moert: error: %s\n", printed.err().what().c_str());
  }
  if (!o.json_file.empty()) {
    std::ofstream out{o.json_file};
    out << json_rows.dump(2) << "\n";
  }
  return 0;
}

int run_bench(bench_options o) {
  // Before a checkpoint is read: a backend that cannot run here is an error naming why.
  auto kind = parse_backend(o.backend);
  if (!kind) {
    std::fprintf(stderr, "moert: error: %s\n", kind.err().what().c_str());
    return 1;
  }
  if (auto usable = actors::check_backend(*kind); !usable.ok()) {
    std::fprintf(stderr, "moert: error: %s\n", usable.err().what().c_str());
    return 1;
  }
  o.backend_kind = *kind;
  if (o.backend_kind != gpu::backend_kind::cpu && o.model_dir.empty()) {
    std::fprintf(stderr, "moert: error: bench --backend %s: without --model it times engines sharing one host copy "
                 "of synthetic weights (cpu only); --model DIR --backend %s times the reference forward and the engine "
                 "on it\n",
                 o.backend.c_str(), o.backend.c_str());
    return 1;
  }
  if (!o.model_dir.empty())
    return run_model_bench(o);
  if (!o.findep_check_testbed.empty())
    return run_findep_check(o);
  auto config = model::parse_config(config_json(o), "bench model");
  if (!config) {
    std::fprintf(stderr, "moert: error: %s\n", config.err().what().c_str());
    return 1;
  }
  std::printf("# moert bench: %zu layers, hidden %zu, %zu/%zu heads of %zu, %zu experts top-%zu, expert "
              "intermediate %zu, vocab %zu (synthetic %s, f32)\n",
              o.layers, o.hidden, o.heads, std::size_t(config->num_kv_heads), std::size_t(config->head_dim), o.experts,
              o.top_k, o.expert_intermediate, o.vocab, o.model_type.c_str());
  std::printf("# KV cache: %lld bytes per token per layer, %lld bytes per token%s\n",
              (long long)config->kv_bytes_per_token_per_layer(),
              (long long)(config->kv_bytes_per_token_per_layer() * config->num_layers),
              config->mla() ? " (MLA: compressed latent + rope key)" : "");
  std::printf("# decode: batch %zu x %zu steps; prefill: %zu sequences x %zu tokens; median (min-max) of %zu runs; "
              "matmul kernel %s\n",
              o.decode_batch, o.decode_steps, o.prefill_sequences, o.prefill_tokens / o.prefill_sequences, o.reps,
              cpu::matmul_kernel_name());
  std::printf("# reproduce: moert bench --model-type %s --reps %zu --decode-batch %zu --prefill %zu --layers %zu "
              "--hidden %zu --experts %zu --top-k %zu%s%s\n",
              o.model_type.c_str(), o.reps, o.decode_batch, o.prefill_tokens, o.layers, o.hidden, o.experts, o.top_k,
              o.only_workload.empty() ? "" : " --only ", o.only_workload.c_str());
  auto weights = std::make_shared<const model::model_weights>(model::synthetic_weights(*config, 1));

  EngineConfig base;
  base.weights = weights;
  base.weights_config = *config;
  base.backend = o.backend_kind;
  base.actor_threads = 1;
  base.defrag.max_wait = std::chrono::nanoseconds{0};
  auto plan_of = [](std::size_t r1, std::size_t r2, const std::string& order) {
    return policy::execution_plan{r1, 0, r2, *policy::parse_segment_order(order)};
  };

  nlohmann::json json_rows = nlohmann::json::array();
  for (const workload& w : workloads(o)) {
    if (!o.only_workload.empty() && o.only_workload != w.name)
      continue;
    auto measure = [&](auto&& one_run) {
      std::vector<sample> runs;
      for (std::size_t r = 0; r < o.reps; ++r)
        runs.push_back(one_run());
      return summarize(std::move(runs));
    };
    // After a configuration's timed runs: one traced run of it, when asked.
    auto trace_run = [&](const std::string& tag, const EngineConfig& c) {
      if (o.trace_dir.empty())
        return;
      std::string file = (std::filesystem::path{o.trace_dir} / (std::string{w.name} + "-" + tag + ".json")).string();
      run_engine(c, w, file);
      std::printf("# trace of %s, %s: %s\n", w.name, tag.c_str(), file.c_str());
    };
    std::printf("\n## %s (%zu tokens counted per run)\n", w.name, w.tokens);
    std::printf("| %-44s | %-24s | %-9s | %s\n", "configuration", "tokens/s", "ratio", "notes");
    std::printf("|----------------------------------------------|--------------------------|-----------|------\n");
    auto row = [&](const std::string& name, const figure& f, double ratio, const std::string& notes) {
      std::printf("| %-44s | %8.1f (%6.1f-%7.1f) | %9.3f | %s\n", name.c_str(), f.median, f.low, f.high, ratio,
                  notes.c_str());
      json_rows.push_back({{"workload", w.name}, {"configuration", name}, {"tokens_per_s", f.median},
                           {"min", f.low}, {"max", f.high}, {"ratio", ratio}, {"notes", notes}});
    };

    model::reference_model bare{*config, weights, 1};
    figure reference = measure([&] { return run_reference(bare, w); });
    row("reference forward, 1 core", reference, 1.0, "baseline");

    EngineConfig one = base;
    one.single_device = true;
    figure single = measure([&] { return run_engine(one, w); });
    trace_run("single", one);
    row("runtime, 1 device (attention + experts)", single, single.median / reference.median,
        "ratio to the bare forward (goal >= 0.95)");

    EngineConfig split = base;
    split.plan = plan_of(1, 1, "ASAS");
    figure serial = measure([&] { return run_engine(split, w); });
    trace_run("serial", split);
    double t_attn = busy(serial.report, "attention"), t_expert = busy(serial.report, "expert");
    double limit = (t_attn + t_expert) / std::max({t_attn, t_expert, 1e-9});
    char notes[256];
    std::snprintf(notes, sizeof notes, "no overlap; busy attention %.0f %%, expert %.0f %%: overlap limit %.2fx",
                  100 * t_attn, 100 * t_expert, limit);
    row("1 attn + 1 expert core, r1 = r2 = 1", serial, serial.median / reference.median, notes);

    // With r1 = 2 the limit above cannot be reached when experts are partly weight-bound.
    // While micro-batch 1's attention runs (A/2 of the no-overlap busy times A and E), the
    // expert device can only run micro-batch 0's rows alone; every expert it runs then is run
    // again for micro-batch 1 and streams its weights twice, or the device idles. Balancing the
    // two (as many split experts as fill A/2), a layer takes at least E + (A/2)·w/u, where an
    // expert costs u at the micro-batch's rows and v at the whole batch's, and w = 2u − v is
    // the part of u that does not shrink with rows (its weight stream, timed below): at best
    // E / (E + (A/2)·w/u) of the limit when E ≥ A. Fully weight-bound (u = v) gives
    // E / (E + A/2); compute-bound (v = 2u) gives the limit itself.
    std::size_t step_tokens = w.requests.size() * (std::string{w.name} == "decode" ? 1 : w.tokens / w.requests.size());
    auto rows_of = [&](std::size_t r1) {
      return std::max<std::size_t>(1, step_tokens * o.top_k / (o.experts * r1));
    };
    expert_cost u = time_experts(*weights, *config, rows_of(2)), v = time_experts(*weights, *config, rows_of(1));
    double weight_share = std::clamp((2 * u.median_us - v.median_us) / u.median_us, 0.0, 1.0);
    std::printf("# an expert (median of %zu, one thread, weights from memory) at %zu rows: %.0f us, at %zu rows: "
                "%.0f us; weight-stream share of the smaller w/u = %.2f\n",
                u.count, rows_of(2), u.median_us, rows_of(1), v.median_us, weight_share);
    auto weight_bound_best = [&](std::size_t r1) {
      if (r1 != 2 || t_expert < t_attn)
        return 0.0;
      return t_expert / (t_expert + t_attn / 2 * weight_share);
    };
    auto overlap_row = [&](const std::string& name, const std::string& tag, policy::execution_plan plan) {
      EngineConfig c = base;
      c.plan = plan;
      // Each run paired with a no-overlap run back to back (odd repetitions overlap first), so
      // a loaded moment of a shared machine hits both: the median of the pairs' speedups is
      // steadier than the ratio of the two medians.
      std::vector<sample> runs;
      std::vector<double> pair_speedups;
      for (std::size_t r = 0; r < o.reps; ++r) {
        sample alone = r % 2 == 0 ? run_engine(split, w) : sample{};
        sample here = run_engine(c, w);
        if (r % 2 == 1)
          alone = run_engine(split, w);
        pair_speedups.push_back(here.tokens_per_s / std::max(alone.tokens_per_s, 1e-9));
        runs.push_back(std::move(here));
      }
      figure f = summarize(std::move(runs)), pairs = summarize_values(pair_speedups);
      trace_run(tag, c);
      double speedup = f.median / serial.median;
      double best = weight_bound_best(plan.r1);
      std::snprintf(notes, sizeof notes,
                    "speedup %.2fx over no overlap = %.2f of the limit (goal >= 0.9); per back-to-back pair %.2fx = "
                    "%.2f (%.2f-%.2f)",
                    speedup, speedup / limit, pairs.median, pairs.median / limit, pairs.low / limit,
                    pairs.high / limit);
      std::string text = notes;
      if (best > 0) {
        std::snprintf(notes, sizeof notes, "; re-streamed expert weights allow at most %.2f of it at r1 = 2", best);
        text += notes;
      }
      // Where the rest goes, in device seconds of the median runs: more expert work than
      // without overlap (split batches, and the other core's memory traffic), or an expert
      // device that is not busy (idle, or running actors between tasks).
      double e_serial = t_expert * serial.lifetime_s, e_here = busy(f.report, "expert") * f.lifetime_s;
      double wall_here = double(w.tokens) / f.median;
      if (e_serial > 0 && wall_here > 0) {
        std::snprintf(notes, sizeof notes, "; expert work %.2fx of no overlap, expert device busy %.0f %% of the run",
                      e_here / e_serial, 100 * e_here / wall_here);
        text += notes;
      }
      row(name, f, f.median / reference.median, text);
    };
    overlap_row("1 + 1, PPPipe r1 = " + std::to_string(o.pppipe_r1), "pppipe", plan_of(o.pppipe_r1, 1, "PPPipe"));
    overlap_row("1 + 1, FinDEP r1 = " + std::to_string(o.findep_r1) + ", r2 = " + std::to_string(o.findep_r2) + ", " +
                    o.findep_order,
                "findep", plan_of(o.findep_r1, o.findep_r2, o.findep_order));

    for (auto sched : {policy::queue_policy::defrag, policy::queue_policy::mtfs, policy::queue_policy::flfs}) {
      EngineConfig c = base;
      c.plan = plan_of(o.findep_r1, o.findep_r2, o.findep_order);
      c.scheduler = sched;
      figure f = measure([&] { return run_engine(c, w); });
      if (sched != base.scheduler)  // the default scheduler's run is the "findep" row's, traced above
        trace_run("findep-" + std::string{to_string(sched)}, c);
      std::snprintf(notes, sizeof notes, "expert batch mean %.1f, %.2f executions per (layer, wave)",
                    f.report.expert_batch_mean, f.report.executions_per_layer_wave);
      row("1 + 1, FinDEP plan, scheduler " + std::string{to_string(sched)}, f, f.median / reference.median, notes);
    }
  }
  if (!o.json_file.empty()) {
    std::ofstream out{o.json_file};
    out << json_rows.dump(2) << "\n";
  }
  return 0;
}

}  // namespace

command_runner add_bench_command(CLI::App& app) {
  auto o = std::make_shared<bench_options>();
  CLI::App* sub = app.add_subcommand("bench", "Runtime vs bare forward, overlap of FinDEP plans, queue schedulers");
  sub->add_option("--model-type", o->model_type, "qwen3_moe or deepseek_v2 (synthetic, same sizes)")
      ->check(CLI::IsMember({"qwen3_moe", "deepseek_v2"}));
  sub->add_option("--backend", o->backend, "With --model: the backend of the reference forward and of the engine's devices, cpu or cuda");
  sub->add_option("--layers", o->layers)->check(CLI::Range(1, 512));
  sub->add_option("--hidden", o->hidden)->check(CLI::Range(16, 65536));
  sub->add_option("--experts", o->experts)->check(CLI::Range(1, 4096));
  sub->add_option("--top-k", o->top_k)->check(CLI::Range(1, 64));
  sub->add_option("--expert-intermediate", o->expert_intermediate)->check(CLI::Range(1, 65536));
  sub->add_option("--decode-batch", o->decode_batch)->check(CLI::Range(1, 4096));
  sub->add_option("--decode-steps", o->decode_steps)->check(CLI::Range(1, 4096));
  sub->add_option("--prefill", o->prefill_tokens, "Prompt tokens in the prefill run")->check(CLI::Range(1, 1 << 20));
  sub->add_option("--prefill-sequences", o->prefill_sequences)->check(CLI::Range(1, 4096));
  sub->add_option("--reps", o->reps, "Runs per figure")->check(CLI::Range(1, 100));
  sub->add_option("--findep-r1", o->findep_r1)->check(CLI::Range(1, 64));
  sub->add_option("--findep-r2", o->findep_r2)->check(CLI::Range(1, 64));
  sub->add_option("--findep-order", o->findep_order, "AASS or ASAS");
  sub->add_option("--pppipe-r1", o->pppipe_r1)->check(CLI::Range(1, 64));
  sub->add_option("--json", o->json_file, "Also write the table as JSON");
  sub->add_option("--trace", o->trace_dir,
                  "Without --model: after each configuration's timed runs, one more run traced (not timed), "
                  "written to DIR/<workload>-<configuration>.json (the FinDEP plan's default scheduler is \"findep\")")
      ->check(CLI::ExistingDirectory);
  sub->add_option("--only", o->only_workload, "Without --model: time only this workload")
      ->check(CLI::IsMember({"decode", "prefill"}));
  sub->add_option("--findep-check", o->findep_check_testbed,
                  "Instead: FinDEP / PPPipe measured vs predicted from this testbed (e.g. cpu)");
  sub->add_option("--check-sequences", o->check_sequences)->check(CLI::Range(1, 4096));
  sub->add_option("--check-seq-len", o->check_seq_len)->check(CLI::Range(1, 1 << 16));
  sub->add_option("--model", o->model_dir,
                  "Instead: llama-bench's figures (prompt, decode at 1 and at --tg-batch sequences) on this "
                  "checkpoint, engine default vs reference forward");
  sub->add_option("--pp", o->pp_tokens, "With --model: prompt tokens of the prompt figure")->check(CLI::Range(1, 1 << 16));
  sub->add_option("--tg", o->tg_tokens, "With --model: decode tokens timed per sequence")->check(CLI::Range(1, 1 << 16));
  sub->add_option("--tg-batch", o->tg_batch, "With --model: sequences of the batched decode figure")
      ->check(CLI::Range(1, 4096));
  sub->add_option("--tg-prompt", o->tg_prompt, "With --model: prompt tokens before the decode figures")
      ->check(CLI::Range(1, 1 << 16));
  sub->add_option("--reference-threads", o->reference_threads, "With --model: threads of the reference forward")
      ->check(CLI::Range(1, 256));
  sub->add_option("--cluster", o->cluster_file,
                  "With --model: run the engine on the `moert node` processes of this cluster file");
  sub->add_option("--secret-file", o->secret_file, "With --cluster: the cluster's shared secret");
  sub->add_option("--faults", o->faults_file,
                  "With --model: run the engine under this fault plan (what recovery costs in throughput)");
  return [o] {
    if (!o->faults_file.empty() && o->model_dir.empty()) {
      std::fprintf(stderr, "moert: error: bench --faults needs --model DIR\n");
      return 1;
    }
    if (!o->cluster_file.empty() && o->model_dir.empty()) {
      std::fprintf(stderr, "moert: error: bench --cluster needs --model DIR (the nodes load the checkpoint); "
                           "build/bench/moert_bench_cluster measures the synthetic bench model\n");
      return 1;
    }
    if (o->top_k > o->experts || o->prefill_sequences > o->prefill_tokens) {
      std::fprintf(stderr, "moert: error: inconsistent bench shape (top-k <= experts, prefill-sequences <= prefill)\n");
      return 1;
    }
    return run_bench(*o);
  };
}

}  // namespace moert::cli
