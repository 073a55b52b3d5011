#include "calibrate_cuda.hpp"

#include "core/rng.hpp"
#include "gpu/cuda/backend.hpp"
#include "gpu/cuda/gemm.hpp"
#include "policy_commands.hpp"
#include "policy/perf_model.hpp"
#include "policy/testbed_json.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <cstring>
#include <fstream>
#include <limits>
#include <vector>

namespace moert::cli {

namespace {

namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

int fail(const error& err) {
  std::fprintf(stderr, "moert: error: %s\n", err.what().c_str());
  return 1;
}

double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

std::vector<float> random_floats(std::size_t n, std::uint64_t seed) {
  rng gen{seed};
  std::vector<float> v(n);
  for (float& x : v)
    x = gen.uniform(-1.0f, 1.0f);
  return v;
}

// Median milliseconds of `issue` (work enqueued on the backend) over `trials` runs after
// `warmup`, each run timed from issue to the end of synchronize(): what a device task costs.
template <class F>
result<double> median_ms(cuda::cuda_backend& b, std::size_t warmup, std::size_t trials, F&& issue) {
  for (std::size_t i = 0; i < warmup; ++i)
    issue();
  if (auto s = b.checked_synchronize(); !s.ok())
    return s.err();
  std::vector<double> ms;
  for (std::size_t i = 0; i < trials; ++i) {
    auto t0 = clock_type::now();
    issue();
    b.synchronize();
    ms.push_back(seconds_since(t0) * 1e3);
  }
  if (auto s = b.checked_synchronize(); !s.ok())
    return s.err();
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

result<dtype> parse_dtype(const std::string& name) {
  if (name == "bf16")
    return dtype::bf16;
  if (name == "f32")
    return dtype::f32;
  return make_error(error_code::invalid_argument, "--dtype '" + name + "': expected bf16 or f32");
}

// Random weights held as `type` on the host (upload_matrix never narrows): bf16 by rounding
// to nearest even, as a checkpoint's bf16 would be.
std::vector<std::uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<std::uint16_t> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    std::uint32_t u;
    std::memcpy(&u, &v[i], sizeof u);
    out[i] = std::uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  return out;
}

}  // namespace

int run_calibrate_cuda(const cuda_calibrate_options& opt) {
  auto started = clock_type::now();
  auto type = parse_dtype(opt.dtype);
  if (!type)
    return fail(type.err());
  auto made = cuda::cuda_backend::create(opt.device);
  if (!made)
    return fail(make_error(made.err().code, "calibrate --backend cuda: " + made.err().message));
  cuda::cuda_backend& b = **made;
  auto described = cuda::describe_device(opt.device);
  std::string gpu = described ? *described : b.name();
  std::printf("# moert calibrate --backend cuda on %s (%zu warm-up + %zu measured runs per point, median)\n",
              gpu.c_str(), opt.warmup, opt.trials);

  // -- 1. dense GEMM line (x = m·k·n MACs), f32 activations against `type` weights ----------
  struct gemm_point { std::size_t m, k, n; };
  std::vector<gemm_point> gemms;
  for (std::size_t m : {16, 64, 256, 1024, 4096})
    for (std::size_t kn : {1024, 2048, 4096})
      gemms.push_back({m, kn, kn});
  sample_set gemm, attn, copy;
  for (const gemm_point& g : gemms) {
    auto w_host = random_floats(g.n * g.k, 1);
    auto w_bf16 = *type == dtype::bf16 ? to_bf16(w_host) : std::vector<std::uint16_t>{};
    gpu::matrix_part part{*type == dtype::bf16 ? static_cast<const void*>(w_bf16.data()) : w_host.data(), *type, g.n,
                          g.k};
    auto w = b.upload_matrix(*type, g.k, std::span<const gpu::matrix_part>{&part, 1});
    if (!w)
      return fail(w.err());
    gpu::buffer x = b.upload_floats(random_floats(g.m * g.k, 2));
    gpu::buffer y = b.allocate(g.m * g.n * sizeof(float));
    auto ms = median_ms(b, opt.warmup, opt.trials, [&] { b.matmul(x.floats(), g.m, *w, y.floats(), nullptr); });
    if (!ms)
      return fail(ms.err());
    gemm.x.push_back(double(g.m * g.k * g.n));
    gemm.y.push_back(*ms);
    std::printf("gemm %5zu x %4zu x %4zu: %9.4f ms  %7.1f TFLOP/s\n", g.m, g.k, g.n, *ms,
                2.0 * double(g.m * g.k * g.n) / (*ms * 1e-3) / 1e12);
  }

  // -- 2. attention line (x = ctx² · heads · 2 · head_dim MACs, as the cpu calibration) ------
  const std::size_t heads = 8, head_dim = 64;
  for (std::size_t ctx : {256, 512, 1024, 2048, 4096}) {
    gpu::buffer q = b.upload_floats(random_floats(ctx * heads * head_dim, 3));
    gpu::buffer kv = b.upload_floats(random_floats(ctx * heads * head_dim, 4));
    gpu::buffer out = b.allocate(ctx * heads * head_dim * sizeof(float));
    std::vector<gpu::kv_rows> rows(ctx, gpu::kv_rows{kv.floats(), kv.floats(), ctx});
    gpu::attention_shape shape{heads, heads, head_dim, heads * head_dim, 1.0f / std::sqrt(float(head_dim))};
    auto ms = median_ms(b, opt.warmup, opt.trials, [&] { b.attention(q.floats(), rows, shape, out.floats()); });
    if (!ms)
      return fail(ms.err());
    attn.x.push_back(double(ctx) * double(ctx) * double(heads * 2 * head_dim));
    attn.y.push_back(*ms);
    std::printf("attention %4zu x %4zu: %9.4f ms\n", ctx, ctx, *ms);
  }

  // -- 3. device copy line (x = bytes): the in-process path between two devices' buffers ----
  for (std::size_t bytes : {std::size_t{1} << 22, std::size_t{1} << 24, std::size_t{1} << 26, std::size_t{1} << 28}) {
    gpu::buffer src = b.allocate(bytes), dst = b.allocate(bytes);
    auto ms = median_ms(b, opt.warmup, opt.trials, [&] { b.copy(dst.data(), src.data(), bytes); });
    if (!ms)
      return fail(ms.err());
    copy.x.push_back(double(bytes));
    copy.y.push_back(*ms);
    std::printf("copy %6zu MiB: %9.4f ms  %7.1f GB/s (read + write counted once)\n", bytes >> 20, *ms,
                double(bytes) / (*ms * 1e-3) / 1e9);
  }

  // -- 4. grouped vs dense expert GEMMs: the crossover ---------------------------------------
  std::vector<std::size_t> grid{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096};
  cuda::expert_gemm_shape gate_up{2 * opt.expert_intermediate, opt.hidden, *type, opt.experts};
  cuda::expert_gemm_shape down{opt.hidden, opt.expert_intermediate, *type, opt.experts};
  int reps = int(std::max<std::size_t>(opt.trials, 3));
  auto sweep_up = cuda::time_expert_gemms(b.ctx(), gate_up, grid, reps);
  if (!sweep_up)
    return fail(sweep_up.err());
  auto sweep_down = cuda::time_expert_gemms(b.ctx(), down, grid, reps);
  if (!sweep_down)
    return fail(sweep_down.err());
  std::printf("\nexpert GEMMs, %zu experts of hidden %zu, FFN %zu, %s weights (ms for all experts; TFLOP/s; "
              "best of grouped/dense as %% of the dense peak = one cuBLAS GEMM of experts x rows rows)\n",
              opt.experts, opt.hidden, opt.expert_intermediate, opt.dtype.c_str());
  std::printf("| %-8s | %-5s | %10s | %10s | %10s | %8s | %8s | %8s | %6s |\n", "proj", "rows", "grouped ms", "dense ms",
              "peak ms", "grp TF/s", "dns TF/s", "peak", "best %");
  std::vector<cuda::gemm_timing> both;
  for (std::size_t i = 0; i < grid.size(); ++i) {
    for (int p = 0; p < 2; ++p) {
      const auto& shape = p == 0 ? gate_up : down;
      const cuda::gemm_timing& t = p == 0 ? (*sweep_up)[i] : (*sweep_down)[i];
      double g = cuda::gemm_timing::tflops(shape, t.rows, t.grouped_ms);
      double d = cuda::gemm_timing::tflops(shape, t.rows, t.dense_ms);
      double peak = cuda::gemm_timing::tflops(shape, t.rows, t.dense_peak_ms);
      std::printf("| %-8s | %5zu | %10.4f | %10.4f | %10.4f | %8.1f | %8.1f | %8.1f | %5.1f%% |\n",
                  p == 0 ? "gate_up" : "down", t.rows, t.grouped_ms, t.dense_ms, t.dense_peak_ms, g, d, peak,
                  100.0 * std::max(g, d) / std::max(peak, 1e-12));
    }
    // The switch decides per expert for both projections at once: fit it on their sum.
    const cuda::gemm_timing& u = (*sweep_up)[i];
    const cuda::gemm_timing& w = (*sweep_down)[i];
    cuda::gemm_timing sum;
    sum.rows = u.rows;
    sum.grouped_ms = u.grouped_ms + w.grouped_ms;
    sum.dense_ms = u.dense_ms + w.dense_ms;
    sum.dense_peak_ms = u.dense_peak_ms + w.dense_peak_ms;
    sum.grouped_spread = std::max(u.grouped_spread, w.grouped_spread);
    sum.dense_spread = std::max(u.dense_spread, w.dense_spread);
    both.push_back(sum);
  }
  char source[512];
  std::snprintf(source, sizeof source,
                "moert calibrate --backend cuda on %s: gate_up + down of %zu experts, hidden %zu, FFN %zu, %s, "
                "rows 1..4096 per expert, median of %d",
                gpu.c_str(), opt.experts, opt.hidden, opt.expert_intermediate, opt.dtype.c_str(), reps);
  auto sw = cuda::fit_gemm_switch(both, source);
  if (!sw)
    return fail(sw.err());
  bool never = sw->dense_min_rows == std::numeric_limits<std::size_t>::max();
  if (never)
    std::printf("crossover: dense never beat grouped up to %zu rows per expert (always grouped)\n", grid.back());
  else
    std::printf("crossover: dense from %zu rows per expert (grouped below)\n", sw->dense_min_rows);

  // -- the testbed ---------------------------------------------------------------------------
  auto g = fit_and_report("gemm", gemm);
  auto a = fit_and_report("attention", attn);
  auto c = fit_and_report("comm (copy)", copy);
  for (auto* r : {&g, &a, &c})
    if (!*r)
      return fail(r->err());
  policy::testbed bed;
  bed.name = !opt.name.empty() ? opt.name : !opt.out.empty() ? fs::path{opt.out}.stem().string() : "cuda";
  bed.gemm = *g;
  bed.attention = *a;
  bed.comm_default = *c;
  std::size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess)
    total_bytes = 0;
  bed.device_memory_bytes = double(total_bytes);
  bed.reserved_bytes = std::min(bed.device_memory_bytes / 8, 4.0 * double(1ull << 30));
  policy::expert_gemm_crossover crossover;
  if (!never)
    crossover.dense_min_rows = sw->dense_min_rows;
  crossover.source = source;
  bed.expert_gemm = crossover;
  char notes[768];
  std::snprintf(notes, sizeof notes,
                "Calibrated by `moert calibrate --backend cuda` on %s, %s weights, f32 activations, %zu warm-up + %zu "
                "measured runs per point (median), timed from issue to synchronize, %.1f s. shared_expert is derived "
                "from gemm. comm_default is a device-to-device copy (the in-process path); NCCL and UCX between "
                "processes are not measured here. device_memory_gib is cudaMemGetInfo's total.",
                gpu.c_str(), opt.dtype.c_str(), opt.warmup, opt.trials, seconds_since(started));
  bed.notes = notes;
  if (bed.device_memory_bytes <= 0)
    return fail(make_error(error_code::device_error, "calibrate --backend cuda: cudaMemGetInfo failed"));
  std::string text = policy::to_json(bed);
  if (opt.out.empty()) {
    std::printf("%s", text.c_str());
    return 0;
  }
  std::error_code ec;
  if (fs::path{opt.out}.has_parent_path())
    fs::create_directories(fs::path{opt.out}.parent_path(), ec);
  std::ofstream out{opt.out, std::ios::binary};
  out << text;
  if (!out)
    return fail(make_error(error_code::io_error, "cannot write " + opt.out));
  std::printf("wrote %s (%.1f s)\n", opt.out.c_str(), seconds_since(started));
  return 0;
}

}  // namespace moert::cli
