// moert's batch-invariant matmul against OpenBLAS sgemm on nn.Linear shapes.
//
// Usage: gemm_bench [--quick] [--weights f32|bf16|f16] [--decode]
// --decode measures instead the weight bandwidth of decode-shaped products (M = 1..16 rows
// on the bench checkpoint's shapes), f32 and bf16 weights, each shape's weights copied
// enough times that a pass streams them from DRAM, not from the 32 MiB L3 (a decode step
// reads ~300 MB of weights, so nothing it streams is cached either).
// --weights packs moert's weights in that type (widened in registers; the values are the
// f32 weights rounded to it, so max_rel then shows the rounding, not a kernel error).
// GFLOP/s = 2·M·N·K / time; each cell is the median and min–max over repetitions that
// each run for at least `min_rep_seconds`. Weights are packed once, outside the timing,
// as the runtime does at load time.
#include "core/rng.hpp"
#include "gpu/cpu/gemm.hpp"
#include "gpu/cpu/thread_pool.hpp"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;

struct stats {
  double median, min, max;
};

// Runs `fn` in batches sized to last at least `min_seconds`, returns GFLOP/s per batch.
stats measure(const std::function<void()>& fn, double flops, int reps, double min_seconds) {
  fn();  // warm caches, page in, start the pool's threads
  std::size_t iters = 1;
  for (;;) {
    auto t0 = clock_type::now();
    for (std::size_t i = 0; i < iters; ++i)
      fn();
    double s = std::chrono::duration<double>(clock_type::now() - t0).count();
    if (s >= min_seconds)
      break;
    iters = s <= 0 ? iters * 10 : std::max<std::size_t>(iters + 1, std::size_t(iters * 1.2 * min_seconds / s));
  }
  std::vector<double> rates;
  for (int r = 0; r < reps; ++r) {
    auto t0 = clock_type::now();
    for (std::size_t i = 0; i < iters; ++i)
      fn();
    double s = std::chrono::duration<double>(clock_type::now() - t0).count();
    rates.push_back(flops * double(iters) / s * 1e-9);
  }
  std::sort(rates.begin(), rates.end());
  return {rates[rates.size() / 2], rates.front(), rates.back()};
}

// GB/s of weight bytes: matmul of `m` rows against each of `copies` (≥ 256 MiB in all),
// cycling, so every call streams its weights from DRAM. `batch` > 1 runs that many copies per
// matmul_batch call, as a layer's experts run in decode.
stats decode_bandwidth(moert::dtype type, std::size_t n, std::size_t k, std::size_t m, std::size_t batch,
                       moert::cpu::thread_pool& pool, int reps, double min_seconds) {
  moert::rng gen{7};
  std::vector<std::uint16_t> half(n * k);
  std::vector<float> w(n * k);
  for (std::size_t i = 0; i < w.size(); ++i) {
    w[i] = gen.uniform(-1.0f, 1.0f);
    std::uint32_t u;
    std::memcpy(&u, &w[i], sizeof u);
    half[i] = std::uint16_t(u >> 16);
  }
  auto one = type == moert::dtype::f32 ? moert::cpu::packed_matrix::pack(w.data(), n, k)
                                       : moert::cpu::packed_matrix::pack(type, half.data(), n, k);
  const std::size_t bytes = one.num_bytes();
  std::size_t copies = std::max<std::size_t>(batch, (std::size_t{256} << 20) / bytes);
  copies = (copies + batch - 1) / batch * batch;
  std::vector<moert::cpu::packed_matrix> ws;
  for (std::size_t c = 0; c < copies; ++c)
    ws.push_back(type == moert::dtype::f32 ? moert::cpu::packed_matrix::pack(w.data(), n, k)
                                           : moert::cpu::packed_matrix::pack(type, half.data(), n, k));
  std::vector<float> x(batch * m * k), y(batch * m * n);
  for (float& v : x)
    v = gen.uniform(-1.0f, 1.0f);
  std::size_t next = 0;
  std::vector<moert::cpu::matmul_entry> entries(batch);
  auto fn = [&] {
    if (batch == 1) {
      moert::cpu::matmul(x.data(), m, ws[next], y.data(), &pool);
    } else {
      for (std::size_t i = 0; i < batch; ++i)
        entries[i] = {&ws[next + i], x.data() + i * m * k, m, y.data() + i * m * n};
      moert::cpu::matmul_batch(entries, &pool);
    }
    next = (next + batch) % copies;
  };
  // measure() reports G-units per second of its second argument: here GB of weights.
  return measure(fn, double(bytes * batch), reps, min_seconds);
}

// Sum of p[0, count) in 32-byte lanes with four independent sums, so several loads are in
// flight; cloned for AVX2 (the kernels' ISA), picked at load time where the CPU has it.
typedef std::uint64_t read_lane __attribute__((vector_size(32)));
__attribute__((target_clones("avx2", "default"))) std::uint64_t sum_lanes(const read_lane* p, std::size_t count) {
  read_lane s0{}, s1{}, s2{}, s3{};
  for (std::size_t i = 0; i < count; i += 4) {
    s0 += p[i];
    s1 += p[i + 1];
    s2 += p[i + 2];
    s3 += p[i + 3];
  }
  read_lane s = s0 + s1 + s2 + s3;
  return s[0] + s[1] + s[2] + s[3];
}

// GB/s of a plain read of 512 MiB (summed, so nothing is optimised away), split over the
// pool's threads: what DRAM gives this machine, the ceiling of every cell below.
// `data`: 512 MiB of read_lane{1, 1, 1, 1}, written once so its pages are resident.
stats dram_read_bandwidth(moert::cpu::thread_pool& pool, const std::vector<read_lane>& data, int reps) {
  const std::size_t lanes = data.size();
  const std::size_t tasks = pool.num_threads(), per_task = lanes / tasks / 4 * 4;
  std::vector<std::uint64_t> sums(tasks);
  auto fn = [&] {
    pool.parallel_for(tasks, [&](std::size_t begin, std::size_t end) {
      for (std::size_t t = begin; t < end; ++t) {
        const read_lane* p = data.data() + per_task * t;
        sums[t] = sum_lanes(p, per_task);
      }
    });
  };
  stats st = measure(fn, double(tasks * per_task * sizeof(read_lane)), reps, 0.0);
  for (std::uint64_t s : sums)
    if (s != 4 * per_task)
      std::fprintf(stderr, "dram_read_bandwidth: wrong sum %llu\n", (unsigned long long)s);
  return st;
}

int run_decode(int reps, double min_seconds) {
  std::printf("# GB/s of weight bytes streamed (weights cycled over >= 256 MiB, from DRAM), median [min-max]\n");
  {
    moert::cpu::thread_pool one{1}, two{2};
    const std::vector<read_lane> data((std::size_t{512} << 20) / sizeof(read_lane), read_lane{1, 1, 1, 1});
    stats r1 = dram_read_bandwidth(one, data, reps), r2 = dram_read_bandwidth(two, data, reps);
    std::printf("# DRAM read on this machine (512 MiB, summed): %.1f [%.1f-%.1f] GB/s on 1 thread, "
                "%.1f [%.1f-%.1f] on 2\n",
                r1.median, r1.min, r1.max, r2.median, r2.min, r2.max);
  }
  std::printf("%-18s %5s %5s %5s     %-17s %-17s %-17s %-17s\n", "shape", "N", "K", "M", "f32 1 thread",
              "f32 2 threads", "bf16 1 thread", "bf16 2 threads");
  struct shape {
    const char* name;
    std::size_t n, k, batch;
  };
  const shape shapes[] = {{"q, o, gate+up", 1024, 1024, 1},
                          {"expert down", 1024, 512, 1},
                          {"4 experts gate+up", 1024, 1024, 4},
                          {"4 experts down", 1024, 512, 4},
                          {"logits", 4096, 1024, 1}};
  moert::cpu::thread_pool pools[] = {moert::cpu::thread_pool{1}, moert::cpu::thread_pool{2}};
  for (const shape& s : shapes) {
    for (std::size_t m : {1, 2, 4, 16}) {
      std::printf("%-18s %5zu %5zu %5zu    ", s.name, s.n, s.k, m);
      for (moert::dtype type : {moert::dtype::f32, moert::dtype::bf16})
        for (auto& pool : pools) {
          stats st = decode_bandwidth(type, s.n, s.k, m, s.batch, pool, reps, min_seconds);
          std::printf(" %5.1f [%4.1f-%4.1f]", st.median, st.min, st.max);
          std::fflush(stdout);
        }
      std::printf("\n");
    }
  }
  return 0;
}

std::string cell(const stats& s) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%6.1f [%5.1f-%5.1f]", s.median, s.min, s.max);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, decode = false;
  moert::dtype weight_type = moert::dtype::f32;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--decode") == 0) {
      decode = true;
    } else if (std::strcmp(argv[i], "--weights") == 0 && i + 1 < argc &&
               (std::strcmp(argv[i + 1], "f32") == 0 || std::strcmp(argv[i + 1], "bf16") == 0 ||
                std::strcmp(argv[i + 1], "f16") == 0)) {
      std::string t = argv[++i];
      weight_type = t == "f32" ? moert::dtype::f32 : t == "bf16" ? moert::dtype::bf16 : moert::dtype::f16;
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--weights f32|bf16|f16] [--decode]\n", argv[0]);
      return 2;
    }
  }
  const int reps = quick ? 3 : 7;
  const double min_seconds = quick ? 0.02 : 0.1;

  // The environment picks both libraries' kernels, so it is part of the command.
  std::printf("# reproduce:");
  for (const char* name : {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                           "MOERT_GEMM_KERNEL"})
    if (const char* value = std::getenv(name))
      std::printf(" %s=%s", name, value);
  for (int i = 0; i < argc; ++i)
    std::printf(" %s", argv[i]);
  std::printf("\n# moert kernel: %s, %s weights   openblas core: %s   reps: %d x >= %.2f s\n",
              moert::cpu::matmul_kernel_name(), std::string{moert::safetensors_name(weight_type)}.c_str(),
              openblas_get_corename(), reps, min_seconds);
  if (decode)
    return run_decode(reps, min_seconds);
  std::printf("# GFLOP/s = 2*M*N*K/time, median [min-max]; max_rel = max|moert-blas|/max|blas|\n");
  std::printf("%5s %5s %5s %3s  %-22s %-22s %6s %8s\n", "M", "K", "N", "thr", "moert", "openblas",
              "ratio", "max_rel");

  const std::size_t shapes[][2] = {{2048, 768}, {768, 2048}};  // {K, N}
  const std::size_t batch[] = {1, 8, 64, 512};
  moert::cpu::thread_pool pools[] = {moert::cpu::thread_pool{1}, moert::cpu::thread_pool{2}};
  moert::rng gen{42};
  for (auto [k, n] : shapes) {
    std::vector<float> w(n * k);
    for (float& v : w)
      v = gen.uniform(-1.0f, 1.0f);
    // Rounded to the weight type, so both libraries multiply the same values.
    std::vector<std::uint16_t> half(w.size());
    if (weight_type != moert::dtype::f32) {
      for (std::size_t i = 0; i < w.size(); ++i) {
        std::uint32_t u;
        std::memcpy(&u, &w[i], sizeof u);
        if (weight_type == moert::dtype::bf16) {
          half[i] = std::uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        } else {
          _Float16 h = static_cast<_Float16>(w[i]);
          std::memcpy(&half[i], &h, sizeof h);
        }
      }
      moert::convert_to_f32(weight_type, half.data(), w.size(), w.data());
    }
    auto packed = weight_type == moert::dtype::f32
                      ? moert::cpu::packed_matrix::pack(w.data(), n, k)
                      : moert::cpu::packed_matrix::pack(weight_type, half.data(), n, k);
    for (std::size_t m : batch) {
      std::vector<float> x(m * k), y(m * n), y_blas(m * n);
      for (float& v : x)
        v = gen.uniform(-1.0f, 1.0f);
      const double flops = 2.0 * double(m) * double(n) * double(k);
      for (auto& pool : pools) {
        int threads = int(pool.num_threads());
        openblas_set_num_threads(threads);
        stats ours = measure([&] { moert::cpu::matmul(x.data(), m, packed, y.data(), &pool); },
                             flops, reps, min_seconds);
        stats blas = measure(
            [&] {
              cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(m), int(n), int(k), 1.0f,
                          x.data(), int(k), w.data(), int(k), 0.0f, y_blas.data(), int(n));
            },
            flops, reps, min_seconds);
        float diff = 0.0f, scale = 0.0f;
        for (std::size_t i = 0; i < y.size(); ++i) {
          diff = std::max(diff, std::fabs(y[i] - y_blas[i]));
          scale = std::max(scale, std::fabs(y_blas[i]));
        }
        std::printf("%5zu %5zu %5zu %3d  %-22s %-22s %6.2f %8.1e\n", m, k, n, threads,
                    cell(ours).c_str(), cell(blas).c_str(), ours.median / blas.median,
                    double(diff / scale));
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
