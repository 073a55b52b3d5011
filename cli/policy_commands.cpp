#include "policy_commands.hpp"

#include "calibrate_cuda.hpp"

#include "core/rng.hpp"
#include "gpu/cpu/gemm.hpp"
#include "gpu/cpu/ops.hpp"
#include "gpu/cpu/thread_pool.hpp"
#include "policy/findep.hpp"
#include "policy/gantt.hpp"
#include "policy/simulator.hpp"
#include "policy/testbed_json.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <thread>
#include <unistd.h>

namespace moert::cli {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

int fail(const error& err) {
  std::fprintf(stderr, "moert: error: %s\n", err.what().c_str());
  return 1;
}

result<std::string> read_text(const fs::path& path) {
  std::ifstream in{path, std::ios::binary};
  if (!in)
    return make_error(error_code::io_error, "cannot open " + path.string());
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

status write_text(const fs::path& path, const std::string& text) {
  if (path.has_parent_path()) {
    std::error_code ec;
    fs::create_directories(path.parent_path(), ec);
  }
  std::ofstream out{path, std::ios::binary};
  out << text;
  if (!out)
    return make_error(error_code::io_error, "cannot write " + path.string());
  return status::success();
}

// A path as given, else configs/<folder>/<name>.json under ./ then under the source tree.
result<fs::path> find_config(const std::string& name_or_path, const std::string& folder) {
  if (fs::is_regular_file(name_or_path))
    return fs::path{name_or_path};
  std::string file = name_or_path;
  std::transform(file.begin(), file.end(), file.begin(), [](unsigned char c) { return std::tolower(c); });
  for (fs::path root : {fs::path{"configs"}, fs::path{MOERT_CONFIGS_DIR}}) {
    fs::path candidate = root / folder / (file + ".json");
    if (fs::is_regular_file(candidate))
      return candidate;
  }
  return make_error(error_code::io_error, "no file '" + name_or_path + "' and no configs/" + folder + "/" +
                                              file + ".json");
}

std::chrono::steady_clock::time_point now() {
  return std::chrono::steady_clock::now();
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(now() - start).count();
}

// -- solve --------------------------------------------------------------------------------------

struct problem_options {
  std::string model;
  std::string testbed_name = "paper-a";
  std::size_t ag = 3;
  std::size_t eg = 5;
  std::size_t seq = 1024;
  std::size_t batch = 0;
  std::size_t layers = 0;
  std::size_t r2_max = 64;
};

void add_problem_options(CLI::App* sub, problem_options& opt) {
  sub->add_option("--model", opt.model, "Model shape: name in configs/models/shapes or a path")->required();
  sub->add_option("--testbed", opt.testbed_name, "Testbed: name in configs/testbeds or a path");
  sub->add_option("--ag", opt.ag, "Attention-group devices")->check(CLI::Range(1, 4096));
  sub->add_option("--eg", opt.eg, "Expert-group devices")->check(CLI::Range(1, 4096));
  sub->add_option("--seq", opt.seq, "Sequence length S (tokens per sample)")->check(CLI::Range(1, 1 << 24));
  sub->add_option("--batch", opt.batch, "Samples in the global mini-batch; 0 = bounded by memory only");
  sub->add_option("--layers", opt.layers, "MoE layers modelled; 0 = all of the model's MoE layers");
  sub->add_option("--r2-max", opt.r2_max, "Largest chunk count r2")->check(CLI::Range(1, 4096));
}

struct loaded_problem {
  policy::model_shape shape;
  policy::testbed bed;
  policy::findep_instance inst;
};

result<loaded_problem> load_problem(const problem_options& opt) {
  auto shape = load_model_shape(opt.model);
  if (!shape)
    return shape.err();
  auto bed = load_testbed(opt.testbed_name);
  if (!bed)
    return bed.err();
  std::size_t layers = opt.layers ? opt.layers : shape->num_moe_layers();
  auto inst = policy::make_instance(*shape, *bed, opt.ag, opt.eg, opt.seq, layers, opt.batch);
  if (!inst)
    return inst.err();
  return loaded_problem{*shape, *bed, *inst};
}

std::string describe(const policy::plan& p) {
  char text[256];
  std::snprintf(text, sizeof text, "m_a %zu, r1 %zu, r2 %zu, m_e %.2f, order %s%s", p.m_a, p.r1, p.r2, p.m_e,
                std::string(to_string(p.order)).c_str(), p.pppipe ? " (PPPipe: A2E after shared)" : "");
  return text;
}

struct solve_options : problem_options {
  bool json = false;
  bool printed = false;
};

int run_solve(const solve_options& opt) {
  auto problem = load_problem(opt);
  if (!problem)
    return fail(problem.err());
  const policy::findep_instance& inst = problem->inst;
  policy::solver_options so;
  so.r2_max = opt.r2_max;
  so.goal = opt.printed ? policy::objective::printed_eq13 : policy::objective::corrected;

  // Solver time: the median of repeated solves (at least 5, about 50 ms in all).
  auto start = now();
  auto plan = policy::solve(inst, so);
  if (!plan)
    return fail(plan.err());
  double first = seconds_since(start);
  std::size_t reps = std::clamp<std::size_t>(std::size_t(0.05 / std::max(first, 1e-7)), 5, 2000);
  std::vector<double> times;
  for (std::size_t i = 0; i < reps; ++i) {
    auto t0 = now();
    auto again = policy::solve(inst, so);
    times.push_back(seconds_since(t0) * 1e6);
  }
  std::sort(times.begin(), times.end());
  double solve_us = times[times.size() / 2];
  auto pp = policy::solve_pppipe(inst);
  if (!pp)
    return fail(pp.err());

  if (opt.json) {
    json out = {{"m_a", plan->m_a},
                {"r1", plan->r1},
                {"r2", plan->r2},
                {"m_e", plan->m_e},
                {"order", to_string(plan->order)},
                {"throughput", plan->throughput},
                {"makespan_ms", plan->makespan_ms},
                {"pppipe_throughput", pp->throughput},
                {"pppipe_m_a", pp->m_a},
                {"pppipe_r1", pp->r1},
                {"ratio", plan->throughput / pp->throughput},
                {"solve_us", solve_us}};
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }
  std::printf("model %s, %zu MoE layers; testbed %s; ag %zu, eg %zu; S %zu; %s\n", problem->shape.name.c_str(),
              inst.num_layers, problem->bed.name.c_str(), opt.ag, opt.eg, opt.seq,
              opt.batch ? ("batch " + std::to_string(opt.batch) + " samples").c_str() : "batch bounded by memory");
  std::printf("memory: at most %zu samples per micro-batch; r1 <= %zu at m_a = 1\n",
              policy::max_micro_batch(inst.memory), policy::max_r1(inst.memory, 1));
  std::printf("FinDEP plan (%s objective): %s\n", opt.printed ? "printed Eq. 13" : "corrected",
              describe(*plan).c_str());
  std::printf("  predicted makespan %.3f ms, throughput %.1f tokens/s\n", plan->makespan_ms, plan->throughput);
  std::printf("best PPPipe plan: %s\n", describe(*pp).c_str());
  std::printf("  predicted makespan %.3f ms, throughput %.1f tokens/s\n", pp->makespan_ms, pp->throughput);
  std::printf("FinDEP / PPPipe: %.3fx\n", plan->throughput / pp->throughput);
  std::printf("solver time: %.1f us (median of %zu solves, min %.1f, max %.1f)\n", solve_us, times.size(),
              times.front(), times.back());
  return 0;
}

// -- simulate -----------------------------------------------------------------------------------

struct simulate_options : problem_options {
  std::string policy_name = "findep";
  std::string plan_text;
  std::string gantt;
  bool json = false;
  bool async = false;
  std::string skew = "exp:0.5";
  std::string queue_policy = "defrag";
  std::size_t top_k = 0;
  std::size_t sequences = 64;
  std::size_t iterations = 4;
  std::size_t context = 512;
  std::uint64_t seed = 1;
};

result<policy::plan> parse_plan(const std::string& text) {
  policy::plan p;
  char order[16] = {};
  if (std::sscanf(text.c_str(), "%zu,%zu,%zu,%15s", &p.m_a, &p.r1, &p.r2, order) != 4 || !p.m_a || !p.r1 ||
      !p.r2)
    return make_error(error_code::invalid_argument, "--plan '" + text + "': expected m_a,r1,r2,ASAS|AASS");
  auto parsed = policy::parse_segment_order(order);
  if (!parsed || *parsed == policy::segment_order::pppipe)
    return make_error(error_code::invalid_argument, "--plan '" + text + "': order must be ASAS or AASS");
  p.order = *parsed;
  return p;
}

int run_simulate_async(const simulate_options& opt) {
  auto shape = load_model_shape(opt.model);
  if (!shape)
    return fail(shape.err());
  auto bed = load_testbed(opt.testbed_name);
  if (!bed)
    return fail(bed.err());
  auto skew = policy::parse_skew(opt.skew);
  if (!skew)
    return fail(skew.err());
  policy::async_config base;
  base.num_attention_devices = opt.ag;
  base.num_expert_devices = opt.eg;
  base.sequences_per_device = opt.sequences;
  base.num_iterations = opt.iterations;
  base.skew = *skew;
  base.seed = opt.seed;
  base.record_tasks = !opt.gantt.empty();
  bool sync = opt.queue_policy == "sync";
  if (!sync) {
    auto qp = policy::parse_queue_policy(opt.queue_policy);
    if (!qp)
      return fail(make_error(error_code::invalid_argument, "--queue-policy must be defrag, mtfs, flfs or sync"));
    base.policy = *qp;
  }
  auto config = policy::with_decode_costs(base, *shape, *bed, opt.context);
  if (!config)
    return fail(config.err());
  if (opt.layers)
    config->num_layers = opt.layers;
  if (opt.top_k)
    config->top_k = opt.top_k;
  auto report = sync ? policy::simulate_sync_ep(*config) : policy::simulate_async(*config);
  if (!report)
    return fail(report.err());
  if (opt.json) {
    json out = {{"policy", opt.queue_policy}, {"makespan_ms", report->makespan}, {"throughput", report->throughput},
                {"attention_idle", report->attention_idle}, {"expert_idle", report->expert_idle},
                {"expert_executions", report->expert_executions}, {"mean_expert_batch", report->mean_expert_batch},
                {"fragmentation", report->fragmentation}};
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("%s decode, %s: %zu attention + %zu expert devices, %zu layers, %zu experts top-%zu, skew %s\n",
                sync ? "synchronous EP" : "asynchronous mu-queues", opt.queue_policy.c_str(), opt.ag, opt.eg,
                config->num_layers, config->num_experts, config->top_k, opt.skew.c_str());
    std::printf("makespan %.3f ms, throughput %.1f tokens/s (%zu tokens)\n", report->makespan, report->throughput,
                report->tokens);
    std::printf("idle: attention %.1f%%, expert %.1f%%\n", 100 * report->attention_idle, 100 * report->expert_idle);
    std::printf("expert executions %zu, mean batch %.1f tokens, fragmentation %.3f executions per (layer, expert, "
                "iteration)\n",
                report->expert_executions, report->mean_expert_batch, report->fragmentation);
  }
  if (!opt.gantt.empty()) {
    auto chart = policy::make_gantt(*report, *config, shape->name + " " + opt.queue_policy + " decode");
    auto written = write_text(opt.gantt, policy::render_svg(chart));
    if (!written)
      return fail(written.err());
  }
  return 0;
}

int run_simulate(const simulate_options& opt) {
  if (opt.async)
    return run_simulate_async(opt);
  auto problem = load_problem(opt);
  if (!problem)
    return fail(problem.err());
  const policy::findep_instance& inst = problem->inst;
  policy::graph_policy gp;
  if (opt.policy_name == "findep")
    gp = policy::graph_policy::findep;
  else if (opt.policy_name == "pppipe")
    gp = policy::graph_policy::pppipe;
  else if (opt.policy_name == "synchronous" || opt.policy_name == "sync")
    gp = policy::graph_policy::synchronous;
  else
    return fail(make_error(error_code::invalid_argument, "--policy must be findep, pppipe or synchronous"));

  policy::solver_options so;
  so.r2_max = opt.r2_max;
  auto chosen = !opt.plan_text.empty() ? parse_plan(opt.plan_text)
                : gp == policy::graph_policy::findep ? policy::solve(inst, so)
                                                     : policy::solve_pppipe(inst);
  if (!chosen)
    return fail(chosen.err());
  const policy::plan& p = *chosen;
  auto report = policy::simulate_plan(inst, p.m_a, p.r1, p.r2, p.order, gp, !opt.gantt.empty());
  if (!report)
    return fail(report.err());
  double tps = policy::throughput(inst, p.m_a, p.r1, report->makespan);
  if (opt.json) {
    json idle;
    for (std::size_t r = 0; r < policy::num_resources; ++r)
      idle[std::string(to_string(policy::resource(r)))] = report->idle[r];
    json out = {{"policy", to_string(gp)},  {"m_a", p.m_a},       {"r1", p.r1},
                {"r2", gp == policy::graph_policy::findep ? p.r2 : 1}, {"order", to_string(p.order)},
                {"makespan_ms", report->makespan}, {"throughput", tps}, {"idle_ms", idle}};
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("model %s, %zu MoE layers; testbed %s; ag %zu, eg %zu; S %zu\n", problem->shape.name.c_str(),
                inst.num_layers, problem->bed.name.c_str(), opt.ag, opt.eg, opt.seq);
    std::printf("policy %s, plan %s\n", std::string(to_string(gp)).c_str(), describe(p).c_str());
    std::printf("simulated makespan %.3f ms, throughput %.1f tokens/s\n", report->makespan, tps);
    for (std::size_t r = 0; r < policy::num_resources; ++r)
      std::printf("  %-4s busy %10.3f ms, idle %10.3f ms (%.1f%%)\n",
                  std::string(to_string(policy::resource(r))).c_str(), report->busy[r], report->idle[r],
                  100 * report->idle[r] / report->makespan);
  }
  if (!opt.gantt.empty()) {
    auto chart = policy::make_gantt(*report, problem->shape.name + " " + std::string(to_string(gp)) + " " +
                                                 describe(p));
    auto written = write_text(opt.gantt, policy::render_svg(chart));
    if (!written)
      return fail(written.err());
  }
  return 0;
}

// -- calibrate ----------------------------------------------------------------------------------

struct calibrate_options {
  std::string backend = "cpu";
  cuda_calibrate_options cuda;  // --backend cuda: device and expert shape
  std::string out;
  std::string name;
  std::size_t threads = std::max(1u, std::thread::hardware_concurrency());
  std::size_t warmup = 10;  // the paper's protocol: 10 warm-up, 20 measured (findep.md §4.3)
  std::size_t trials = 20;
};

// Prints "[#####     ] 12/40 label" on one terminal line.
class progress_bar {
public:
  explicit progress_bar(std::size_t total) : total_(total) {}
  void step(const std::string& label) {
    ++done_;
    std::size_t filled = 30 * done_ / total_;
    std::fprintf(stderr, "\r[%s%s] %zu/%zu %-40s", std::string(filled, '#').c_str(),
                 std::string(30 - filled, ' ').c_str(), done_, total_, label.c_str());
    if (done_ == total_)
      std::fprintf(stderr, "\n");
    std::fflush(stderr);
  }

private:
  std::size_t total_;
  std::size_t done_ = 0;
};

// Median milliseconds of `fn` over `trials` runs after `warmup` runs.
template <class F>
double median_ms(std::size_t warmup, std::size_t trials, F&& fn) {
  for (std::size_t i = 0; i < warmup; ++i)
    fn();
  std::vector<double> ms;
  for (std::size_t i = 0; i < trials; ++i) {
    auto t0 = now();
    fn();
    ms.push_back(seconds_since(t0) * 1e3);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

std::vector<float> random_floats(std::size_t n, std::uint64_t seed) {
  rng gen{seed};
  std::vector<float> v(n);
  for (float& x : v)
    x = gen.uniform(-1.0f, 1.0f);
  return v;
}

int run_calibrate(const calibrate_options& opt) {
  if (opt.backend == "cuda") {
#if MOERT_HAVE_CUDA
    cuda_calibrate_options cuda = opt.cuda;
    cuda.out = opt.out;
    cuda.name = opt.name;
    cuda.warmup = opt.warmup;
    cuda.trials = opt.trials;
    return run_calibrate_cuda(cuda);
#else
    return fail(make_error(error_code::unsupported,
                           "calibrate --backend cuda: the cuda backend is not compiled into this build (configure "
                           "with -DMOERT_WITH_CUDA=ON where nvcc 13, cuBLAS and NCCL are installed)"));
#endif
  }
  if (opt.backend != "cpu")
    return fail(make_error(error_code::invalid_argument, "--backend '" + opt.backend + "': expected cpu or cuda"));
  auto started = now();
  cpu::thread_pool pool{opt.threads};

  struct gemm_point { std::size_t m, k, n; };
  std::vector<gemm_point> gemms;
  for (std::size_t m : {8, 32, 128, 512})
    for (std::size_t kn : {256, 512, 1024})
      gemms.push_back({m, kn, kn});
  gemms.push_back({256, 1024, 2048});
  gemms.push_back({512, 2048, 1024});
  const std::size_t heads = 8, head_dim = 64;
  std::vector<std::size_t> contexts{64, 128, 256, 384, 512, 768};
  const std::size_t ffn_m = 512, ffn_h = 1024;
  std::vector<std::size_t> ffn_tokens{8, 32, 64, 128, 256, 512};
  // Sizes beyond the caches, where a copy is bandwidth-bound and linear.
  std::vector<std::size_t> copy_bytes{1 << 22, 1 << 23, 1 << 24, 3 << 23, 1 << 25, 1 << 26};
  progress_bar bar{gemms.size() + contexts.size() + ffn_tokens.size() + copy_bytes.size()};
  char label[96];

  sample_set gemm, attn, ffn, copy;
  for (const gemm_point& g : gemms) {
    auto w = cpu::packed_matrix::pack(random_floats(g.n * g.k, 1).data(), g.n, g.k);
    auto x = random_floats(g.m * g.k, 2);
    std::vector<float> y(g.m * g.n);
    gemm.x.push_back(double(g.m * g.k * g.n));
    gemm.y.push_back(median_ms(opt.warmup, opt.trials, [&] { cpu::matmul(x.data(), g.m, w, y.data(), &pool); }));
    std::snprintf(label, sizeof label, "gemm %zux%zux%zu", g.m, g.k, g.n);
    bar.step(label);
  }
  for (std::size_t ctx : contexts) {
    // A causal-free prefill block: every one of ctx queries attends to ctx keys, split over threads.
    auto q = random_floats(ctx * heads * head_dim, 3), kv = random_floats(ctx * heads * head_dim, 4);
    std::vector<float> out(ctx * heads * head_dim);
    std::vector<std::vector<float>> scratch(opt.threads, std::vector<float>(ctx));
    float scale = 1.0f / std::sqrt(float(head_dim));
    attn.x.push_back(double(ctx) * double(ctx) * double(heads * 2 * head_dim));
    attn.y.push_back(median_ms(opt.warmup, opt.trials, [&] {
      pool.parallel_for(ctx, [&](std::size_t begin, std::size_t end) {
        std::vector<float> scores(ctx);
        for (std::size_t i = begin; i < end; ++i)
          cpu::attend(q.data() + i * heads * head_dim, kv.data(), kv.data(), heads * head_dim, ctx, heads, heads,
                      head_dim, scale, scores.data(), out.data() + i * heads * head_dim);
      });
    }));
    std::snprintf(label, sizeof label, "attention %zu x %zu", ctx, ctx);
    bar.step(label);
  }
  {
    auto gate = cpu::packed_matrix::pack(random_floats(ffn_h * ffn_m, 5).data(), ffn_h, ffn_m);
    auto up = cpu::packed_matrix::pack(random_floats(ffn_h * ffn_m, 6).data(), ffn_h, ffn_m);
    auto down = cpu::packed_matrix::pack(random_floats(ffn_m * ffn_h, 7).data(), ffn_m, ffn_h);
    for (std::size_t tokens : ffn_tokens) {
      auto x = random_floats(tokens * ffn_m, 8);
      std::vector<float> g(tokens * ffn_h), u(tokens * ffn_h), y(tokens * ffn_m);
      ffn.x.push_back(double(tokens * ffn_m * ffn_h));
      ffn.y.push_back(median_ms(opt.warmup, opt.trials, [&] {
        cpu::matmul(x.data(), tokens, gate, g.data(), &pool);
        cpu::matmul(x.data(), tokens, up, u.data(), &pool);
        for (std::size_t t = 0; t < tokens; ++t)
          cpu::silu_mul(g.data() + t * ffn_h, u.data() + t * ffn_h, ffn_h, g.data() + t * ffn_h);
        cpu::matmul(g.data(), tokens, down, y.data(), &pool);
      }));
      std::snprintf(label, sizeof label, "shared expert %zu tokens", tokens);
      bar.step(label);
    }
  }
  for (std::size_t bytes : copy_bytes) {
    // The CPU backend's A2E/E2A is an in-process copy between buffers.
    std::vector<char> src(bytes, 1), dst(bytes);
    copy.x.push_back(double(bytes));
    copy.y.push_back(median_ms(opt.warmup, opt.trials, [&] {
      std::memcpy(dst.data(), src.data(), bytes);
      src[bytes / 2] ^= dst[bytes / 3];
    }));
    std::snprintf(label, sizeof label, "copy %zu KiB", bytes >> 10);
    bar.step(label);
  }

  policy::testbed bed;
  auto g = fit_and_report("gemm", gemm);
  auto a = fit_and_report("attention", attn);
  auto f = fit_and_report("shared_expert", ffn);
  auto c = fit_and_report("comm (copy)", copy);
  for (auto* r : {&g, &a, &f, &c})
    if (!*r)
      return fail(r->err());
  bed.name = opt.name.empty() ? fs::path{opt.out}.stem().string() : opt.name;
  bed.gemm = *g;
  bed.attention = *a;
  bed.shared_expert = *f;
  bed.comm_default = *c;
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  bed.device_memory_bytes = double(pages) * double(page);
  bed.reserved_bytes = std::min(bed.device_memory_bytes / 4, 2.0 * double(1ull << 30));
  char notes[512];
  std::snprintf(notes, sizeof notes,
                "Calibrated by `moert calibrate --backend cpu` with %zu threads, kernel %s, %zu warm-up + %zu "
                "measured trials per point (median), %.1f s. comm_default is an in-process memcpy (the CPU "
                "loopback transport). device_memory_gib is the host's physical memory.",
                opt.threads, cpu::matmul_kernel_name(), opt.warmup, opt.trials, seconds_since(started));
  bed.notes = notes;
  bed.threads = opt.threads;
  if (!opt.out.empty()) {
    auto written = write_text(opt.out, policy::to_json(bed));
    if (!written)
      return fail(written.err());
    std::printf("wrote %s (%.1f s)\n", opt.out.c_str(), seconds_since(started));
  } else {
    std::printf("%s", policy::to_json(bed).c_str());
  }
  return 0;
}

}  // namespace

result<policy::model_shape> load_model_shape(const std::string& name_or_path) {
  auto path = find_config(name_or_path, "models/shapes");
  if (!path)
    return path.err();
  auto text = read_text(*path);
  if (!text)
    return text.err();
  return policy::parse_model_shape(*text, path->string());
}

result<policy::testbed> load_testbed(const std::string& name_or_path) {
  auto path = find_config(name_or_path, "testbeds");
  if (!path)
    return path.err();
  auto text = read_text(*path);
  if (!text)
    return text.err();
  return policy::parse_testbed(*text, path->string());
}

command_runner add_solve_command(CLI::App& app) {
  auto opt = std::make_shared<solve_options>();
  CLI::App* sub = app.add_subcommand("solve", "FinDEP plan (m_a, r1, r2, order) for a model and testbed");
  add_problem_options(sub, *opt);
  sub->add_flag("--json", opt->json, "Print one JSON object");
  sub->add_flag("--printed-eq13", opt->printed, "Use the paper's printed Eq. 13 (ASAS only), for comparison");
  return [opt] { return run_solve(*opt); };
}

command_runner add_simulate_command(CLI::App& app) {
  auto opt = std::make_shared<simulate_options>();
  CLI::App* sub = app.add_subcommand("simulate", "Discrete-event simulation of a plan or of asynchronous mu-queues");
  add_problem_options(sub, *opt);
  sub->add_option("--policy", opt->policy_name, "findep, pppipe or synchronous");
  sub->add_option("--plan", opt->plan_text, "m_a,r1,r2,ASAS|AASS (default: the solver's plan)");
  sub->add_option("--gantt", opt->gantt, "Write the timelines as SVG");
  sub->add_flag("--json", opt->json, "Print one JSON object");
  sub->add_flag("--async", opt->async, "Asynchronous mu-queue decode with skewed expert load");
  sub->add_option("--skew", opt->skew, "uniform, zipf:S, exp:LAMBDA or weights:W,W,...");
  sub->add_option("--queue-policy", opt->queue_policy, "defrag, mtfs, flfs, or sync (barrier EP baseline)");
  sub->add_option("--top-k", opt->top_k, "Override the model's top-k (async)");
  sub->add_option("--sequences", opt->sequences, "Sequences per attention device (async)")->check(CLI::Range(1, 1 << 20));
  sub->add_option("--iterations", opt->iterations, "Decode steps per sequence (async)")->check(CLI::Range(1, 1 << 20));
  sub->add_option("--context", opt->context, "Context length for decode attention cost (async)");
  sub->add_option("--seed", opt->seed, "Routing seed (async)");
  return [opt] { return run_simulate(*opt); };
}

command_runner add_calibrate_command(CLI::App& app) {
  auto opt = std::make_shared<calibrate_options>();
  CLI::App* sub = app.add_subcommand("calibrate", "Fit the alpha-beta cost lines on this machine (microbenchmarks)");
  sub->add_option("--backend", opt->backend,
                  "cpu, or cuda: a GPU testbed with the grouped/dense expert GEMM crossover the CUDA backend uses");
  sub->add_option("--device", opt->cuda.device, "cuda: which GPU")->check(CLI::Range(0, 1024));
  sub->add_option("--hidden", opt->cuda.hidden, "cuda: expert GEMM shape, hidden size")->check(CLI::Range(16, 65536));
  sub->add_option("--expert-intermediate", opt->cuda.expert_intermediate, "cuda: expert FFN size")
      ->check(CLI::Range(16, 65536));
  sub->add_option("--experts", opt->cuda.experts, "cuda: experts on the device")->check(CLI::Range(1, 4096));
  sub->add_option("--dtype", opt->cuda.dtype, "cuda: weight type, bf16 or f32");
  sub->add_option("--out", opt->out, "Testbed JSON to write (default: print)");
  sub->add_option("--name", opt->name, "Testbed name (default: the file's stem)");
  sub->add_option("--threads", opt->threads, "Compute threads")->check(CLI::Range(1, 1024));
  sub->add_option("--warmup", opt->warmup, "Warm-up runs per point")->check(CLI::Range(0, 1000));
  sub->add_option("--trials", opt->trials, "Measured runs per point")->check(CLI::Range(1, 1000));
  return [opt] { return run_calibrate(*opt); };
}

result<policy::linear_fit> fit_and_report(const char* what, const sample_set& samples) {
  auto f = policy::fit_linear_nonnegative(samples.x, samples.y);
  if (!f)
    return make_error(error_code::invalid_argument, std::string(what) + ": " + f.err().message);
  std::printf("%-14s alpha %.4g ms, beta %.4g ms per unit, R^2 %.6f (%zu points)\n", what, f->alpha, f->beta, f->r2,
              samples.x.size());
  return f;
}

}  // namespace moert::cli
