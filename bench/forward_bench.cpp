// Reference-forward throughput: prefill and KV-cache decode tokens/s for the embedded default
// model and a checkpoint (default: ../shared/fixtures/qwen3_moe_tiny), 1 and 2 threads.
// Reports the median and the min–max of repeated runs.
//
//   build/bench/moert_bench_forward [--model DIR] [--reps N] [--quick] [--threads N] [--steps N]
// --threads N runs only that thread count, and only the checkpoint; --steps N decodes N steps
// after each prefill (default 32). Both make smaller runs to profile one phase.

#include "core/rng.hpp"
#include "gpu/cpu/gemm.hpp"
#include "model_source.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

using namespace moert;

namespace {

struct figure {
  double median, low, high;
};

figure summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.front(), v.back()};
}

std::vector<std::vector<std::int32_t>> random_prompts(std::size_t count, std::size_t length,
                                                      std::int64_t vocab, std::uint64_t seed) {
  rng gen{seed};
  std::vector<std::vector<std::int32_t>> prompts(count, std::vector<std::int32_t>(length));
  for (auto& p : prompts)
    for (auto& id : p)
      id = std::int32_t(gen.next_u64() % std::uint64_t(vocab));
  return prompts;
}

// Tokens/s of one prefill of `batch` prompts of `length`, and of `steps` decode steps after it.
std::pair<double, double> run_once(model::reference_model& m, std::size_t batch, std::size_t length,
                                   std::size_t steps, std::uint64_t seed) {
  auto prompts = random_prompts(batch, length, m.config().vocab_size, seed);
  std::vector<model::generation_request> requests;
  for (std::size_t i = 0; i < batch; ++i)
    requests.push_back({i, prompts[i], steps + 1, {}});
  model::generation_stats stats;
  auto out = model::generate(m, requests, model::decode_mode::kv_cache, &stats);
  if (!out) {
    std::fprintf(stderr, "error: %s\n", out.err().what().c_str());
    std::exit(1);
  }
  return {stats.prompt_tokens / stats.prefill_seconds, stats.decode_tokens / stats.decode_seconds};
}

void bench_model(const std::string& dir, const std::string& label, std::size_t reps, std::size_t only_threads,
                 std::size_t steps) {
  for (std::size_t threads : {1u, 2u}) {
    if (only_threads != 0 && threads != only_threads)
      continue;
    auto loaded = cli::load_model(dir, 1, threads);
    if (!loaded) {
      std::fprintf(stderr, "error: %s\n", loaded.err().what().c_str());
      std::exit(1);
    }
    struct shape {
      const char* name;
      std::size_t batch, length, steps;
    };
    for (shape s : {shape{"prefill 1x256 / decode b=1", 1, 256, steps}, shape{"prefill 16x16 / decode b=16", 16, 16, steps}}) {
      std::vector<double> prefill, decode;
      run_once(*loaded->model, s.batch, s.length, 2, 99);  // warm-up
      for (std::size_t r = 0; r < reps; ++r) {
        auto [p, d] = run_once(*loaded->model, s.batch, s.length, s.steps, r + 1);
        prefill.push_back(p);
        decode.push_back(d);
      }
      auto pf = summarize(prefill), df = summarize(decode);
      std::printf("| %-22s | %-28s | %7zu | %9.0f (%6.0f-%6.0f) | %9.1f (%6.1f-%6.1f) |\n", label.c_str(), s.name,
                  threads, pf.median, pf.low, pf.high, df.median, df.low, df.high);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string fixture = std::string{MOERT_DEFAULT_FIXTURE};
  std::size_t reps = 5, only_threads = 0, steps = 32;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--model") && i + 1 < argc)
      fixture = argv[++i];
    else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc)
      reps = std::size_t(std::max(1, std::atoi(argv[++i])));
    else if (!std::strcmp(argv[i], "--quick"))
      reps = 1;
    else if (!std::strcmp(argv[i], "--threads") && i + 1 < argc && std::atoi(argv[i + 1]) >= 1)
      only_threads = std::size_t(std::atoi(argv[++i]));
    else if (!std::strcmp(argv[i], "--steps") && i + 1 < argc && std::atoi(argv[i + 1]) >= 1)
      steps = std::size_t(std::atoi(argv[++i]));
    else {
      std::fprintf(stderr, "usage: %s [--model DIR] [--reps N] [--quick] [--threads N] [--steps N]\n", argv[0]);
      return 2;
    }
  }
  std::printf("# reference forward, tokens/s: median (min-max) of %zu runs; matmul kernel %s\n", reps,
              cpu::matmul_kernel_name());
  std::printf("# reproduce: %s --reps %zu%s%s%s\n", argv[0], reps,
              fixture == MOERT_DEFAULT_FIXTURE ? "" : (" --model " + fixture).c_str(),
              only_threads == 0 ? "" : (" --threads " + std::to_string(only_threads)).c_str(),
              steps == 32 ? "" : (" --steps " + std::to_string(steps)).c_str());
  std::printf("| %-22s | %-28s | threads | prefill tok/s             | decode tok/s              |\n", "model", "shape");
  std::printf("|------------------------|------------------------------|---------|---------------------------|---------------------------|\n");
  if (only_threads == 0)
    bench_model("", "embedded default", reps, 0, steps);
  if (std::filesystem::exists(std::filesystem::path{fixture} / "config.json"))
    bench_model(fixture, std::filesystem::path{fixture}.filename().string(), reps, only_threads, steps);
  else
    std::printf("(checkpoint %s not found: skipped)\n", fixture.c_str());
  return 0;
}
