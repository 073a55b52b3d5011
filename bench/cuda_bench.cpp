// Expert GEMMs on one GPU: the grouped GEMM across a device's experts and one dense GEMM per
// expert (gpu/cuda/gemm.hpp), against cuBLAS's dense ceiling on the same shapes (one GEMM of
// all experts' rows against one weight), and the grouped/dense crossover the sweep implies
// (what `moert calibrate --backend cuda` stores as the switch).
//
// Usage: moert_bench_cuda [--device N] [--dtype bf16|f32|f16] [--reps R] [--quick]
//                         [--shape NAME:HIDDEN:INTER:EXPERTS]...
// Default shapes, per device: Qwen3-30B-A3B (hidden 2048, expert intermediate 768, 16 of its
// 128 experts), DeepSeek-V2-Lite (2048, 1408, 8 of 64), Mixtral-8x7B (4096, 14336, 2 of 8).
// Each expert runs its gate_up (n = 2·inter, k = hidden) and down (n = hidden, k = inter).
// Every time is the median over R CUDA-event-timed repetitions after two warm-ups; spread is
// (max - min) / median. TFLOP/s = 2·rows·n·k·experts / time.
#include "gpu/cuda/device.hpp"
#include "gpu/cuda/gemm.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

using namespace moert;

namespace {

struct shape_arg {
  std::string name;
  std::size_t hidden, inter, experts;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "moert_bench_cuda: %s\nusage: moert_bench_cuda [--device N] [--dtype bf16|f32|f16] [--reps R] "
               "[--quick] [--shape NAME:HIDDEN:INTER:EXPERTS]...\n",
               why);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  int device = 0, reps = 10;
  bool quick = false;
  dtype type = dtype::bf16;
  std::vector<shape_arg> shapes;
  std::string command = "moert_bench_cuda";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    command += " " + a;
    auto next = [&]() -> std::string {
      if (i + 1 >= argc)
        usage(("missing value after " + a).c_str());
      command += std::string{" "} + argv[i + 1];
      return argv[++i];
    };
    if (a == "--device") {
      device = std::atoi(next().c_str());
    } else if (a == "--reps") {
      reps = std::max(1, std::atoi(next().c_str()));
    } else if (a == "--quick") {
      quick = true;
    } else if (a == "--dtype") {
      std::string t = next();
      if (t == "bf16")
        type = dtype::bf16;
      else if (t == "f32")
        type = dtype::f32;
      else if (t == "f16")
        type = dtype::f16;
      else
        usage(("unknown --dtype " + t).c_str());
    } else if (a == "--shape") {
      std::string s = next();
      shape_arg sh;
      char name[64];
      if (std::sscanf(s.c_str(), "%63[^:]:%zu:%zu:%zu", name, &sh.hidden, &sh.inter, &sh.experts) != 4)
        usage(("bad --shape " + s + " (want NAME:HIDDEN:INTER:EXPERTS)").c_str());
      sh.name = name;
      shapes.push_back(sh);
    } else {
      usage(("unknown argument " + a).c_str());
    }
  }
  if (shapes.empty())
    shapes = {{"qwen3-30b-a3b", 2048, 768, 16}, {"deepseek-v2-lite", 2048, 1408, 8}, {"mixtral-8x7b", 4096, 14336, 2}};
  std::vector<std::size_t> grid = quick ? std::vector<std::size_t>{1, 16, 128, 1024, 4096}
                                        : std::vector<std::size_t>{1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192};

  std::printf("# reproduce: %s\n", command.c_str());
  auto ctx = cuda::context::create(device);
  if (!ctx) {
    std::fprintf(stderr, "moert_bench_cuda: %s\n", ctx.err().what().c_str());
    return 1;
  }
  auto desc = cuda::describe_device(device);
  std::printf("# device %d: %s; weights %s, f32 activations, f32 accumulate; %d reps\n", device,
              desc ? desc->c_str() : "?", std::string(safetensors_name(type)).c_str(), reps);

  for (const shape_arg& sh : shapes) {
    for (int proj = 0; proj < 2; ++proj) {
      cuda::expert_gemm_shape s;
      s.type = type;
      s.num_experts = sh.experts;
      s.n = proj == 0 ? 2 * sh.inter : sh.hidden;
      s.k = proj == 0 ? sh.hidden : sh.inter;
      const char* pname = proj == 0 ? "gate_up" : "down";
      auto sweep = cuda::time_expert_gemms(**ctx, s, grid, reps);
      if (!sweep) {
        std::fprintf(stderr, "moert_bench_cuda: %s %s: %s\n", sh.name.c_str(), pname, sweep.err().what().c_str());
        return 1;
      }
      auto sw = cuda::fit_gemm_switch(*sweep, "moert_bench_cuda sweep");
      std::printf("\n## %s %s: %zu experts, n=%zu k=%zu\n", sh.name.c_str(), pname, s.num_experts, s.n, s.k);
      std::printf("%8s %12s %12s %12s | %9s %9s %9s %9s | %8s %s\n", "rows/exp", "grouped ms", "dense ms", "peak ms",
                  "grp TF/s", "dns TF/s", "ours TF/s", "peak TF/s", "ours/pk", "spread g/d");
      for (const cuda::gemm_timing& t : *sweep) {
        double ours = sw->choose(t.rows) == cuda::gemm_kind::dense ? t.dense_ms : t.grouped_ms;
        double peak_tf = cuda::gemm_timing::tflops(s, t.rows, t.dense_peak_ms);
        double ours_tf = cuda::gemm_timing::tflops(s, t.rows, ours);
        std::printf("%8zu %12.4f %12.4f %12.4f | %9.2f %9.2f %9.2f %9.2f | %7.1f%% %.2f/%.2f\n", t.rows, t.grouped_ms,
                    t.dense_ms, t.dense_peak_ms, cuda::gemm_timing::tflops(s, t.rows, t.grouped_ms),
                    cuda::gemm_timing::tflops(s, t.rows, t.dense_ms), ours_tf, peak_tf,
                    peak_tf > 0 ? 100.0 * ours_tf / peak_tf : 0.0, t.grouped_spread, t.dense_spread);
      }
      if (sw->dense_min_rows == std::numeric_limits<std::size_t>::max())
        std::printf("crossover: dense never faster on this grid (always grouped)\n");
      else
        std::printf("crossover: dense from %zu rows per expert\n", sw->dense_min_rows);
    }
  }
  return 0;
}
