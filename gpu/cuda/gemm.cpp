#include "gpu/cuda/gemm.hpp"

#include "gpu/cpu/gemm.hpp"
#include "gpu/cuda/check.hpp"
#include "gpu/cuda/kernels.cuh"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace moert::cuda {

namespace {

constexpr int slot_x16 = 0;   // activations rounded to the weight type
constexpr int slot_y16 = 1;   // grouped 16-bit outputs before widening

cudaDataType_t cuda_type(dtype t) {
  switch (t) {
    case dtype::bf16:
      return CUDA_R_16BF;
    case dtype::f16:
      return CUDA_R_16F;
    case dtype::f32:
      break;
  }
  return CUDA_R_32F;
}

cudaError_t narrow(dtype t, const float* src, std::size_t n, void* dst, cudaStream_t s) {
  return t == dtype::bf16 ? kernels::f32_to_bf16(src, n, static_cast<std::uint16_t*>(dst), s)
                          : kernels::f32_to_f16(src, n, static_cast<std::uint16_t*>(dst), s);
}

cudaError_t widen(dtype t, const void* src, std::size_t n, float* dst, cudaStream_t s) {
  return t == dtype::bf16 ? kernels::bf16_to_f32(static_cast<const std::uint16_t*>(src), n, dst, s)
                          : kernels::f16_to_f32(static_cast<const std::uint16_t*>(src), n, dst, s);
}

status check_int(std::size_t v, const char* what) {
  if (v > std::size_t(std::numeric_limits<int>::max()))
    return make_error(error_code::invalid_argument, std::string{what} + " " + std::to_string(v) +
                                                        " exceeds cuBLAS's int range");
  return {};
}

}  // namespace

result<device_matrix> upload_matrix(context& ctx, dtype type, const void* host, std::size_t n, std::size_t k) {
  MOERT_TRY(ctx.make_current());
  device_matrix m;
  m.type = type;
  m.rows = n;
  m.cols = k;
  auto buf = device_buffer::allocate(ctx.device(), m.num_bytes());
  if (!buf)
    return buf.err();
  m.data = std::move(*buf);
  MOERT_TRY(ctx.upload(m.data.data(), host, m.num_bytes()));
  return m;
}

result<device_matrix> upload_packed(context& ctx, const cpu::packed_matrix& w) {
  // Undo the panel layout: panel p holds W[p·16 + j][c] at element c·16 + j.
  std::size_t n = w.rows(), k = w.cols(), width = cpu::packed_matrix::panel_width;
  std::size_t elem = size_of(w.type());
  std::vector<std::byte> host(n * k * elem);
  for (std::size_t p = 0; p < w.num_panels(); ++p) {
    const std::byte* panel = static_cast<const std::byte*>(w.panel(p));
    for (std::size_t j = 0; j < width && p * width + j < n; ++j)
      for (std::size_t c = 0; c < k; ++c)
        std::memcpy(host.data() + ((p * width + j) * k + c) * elem, panel + (c * width + j) * elem, elem);
  }
  auto m = upload_matrix(ctx, w.type(), host.data(), n, k);
  if (!m)
    return m.err();
  // The host copy dies here: the upload must have left it.
  MOERT_TRY(ctx.synchronize());
  return m;
}

status matmul(context& ctx, const float* x, std::size_t num_rows, const device_matrix& w, float* y) {
  if (num_rows == 0 || w.rows == 0)
    return {};
  MOERT_TRY(check_int(num_rows, "GEMM rows"));
  MOERT_TRY(check_int(w.rows, "GEMM output features"));
  MOERT_TRY(check_int(w.cols, "GEMM input features"));
  const void* b = x;
  if (w.type != dtype::f32) {
    auto xs = ctx.scratch(slot_x16, num_rows * w.cols * 2);
    if (!xs)
      return xs.err();
    MOERT_CUDA_TRY(narrow(w.type, x, num_rows * w.cols, *xs, ctx.stream()));
    b = *xs;
  }
  // Row-major y[M][N] is column-major yᵀ (N×M) = W (N×K, i.e. the row-major K-strided buffer
  // transposed) · xᵀ (K×M).
  const float alpha = 1.0f, beta = 0.0f;
  int m = int(w.rows), n = int(num_rows), k = int(w.cols);
  MOERT_CUBLAS_TRY(cublasGemmEx(ctx.cublas(), CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, w.data.data(),
                                cuda_type(w.type), k, b, cuda_type(w.type), k, &beta, y, CUDA_R_32F, m,
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return {};
}

// -- switch ------------------------------------------------------------------------------------

gemm_switch gemm_switch::uncalibrated_default() {
  return {2048, false,
          "uncalibrated default (EPS-MoE's 2048-row threshold for DeepSeek-V2 on H800, "
          "amoe-eps.md 3.5); run `moert calibrate --backend cuda` to measure this GPU"};
}

gemm_switch gemm_switch::always(gemm_kind kind) {
  if (kind == gemm_kind::dense)
    return {0, false, "always dense"};
  return {std::numeric_limits<std::size_t>::max(), false, "always grouped"};
}

status run_expert_gemms(context& ctx, std::span<const expert_gemm> batch, const gemm_switch& sw,
                        expert_gemm_stats* stats) {
  std::vector<const expert_gemm*> grouped;
  const device_matrix* first = nullptr;
  for (const expert_gemm& g : batch) {
    if (g.rows == 0)
      continue;
    if (first == nullptr)
      first = g.w;
    if (g.w->type != first->type || g.w->rows != first->rows || g.w->cols != first->cols)
      return make_error(error_code::invalid_argument,
                        "run_expert_gemms: experts of one batch must share shape and type (" +
                            std::to_string(first->rows) + "x" + std::to_string(first->cols) + " vs " +
                            std::to_string(g.w->rows) + "x" + std::to_string(g.w->cols) + ")");
    if (sw.choose(g.rows) == gemm_kind::dense) {
      MOERT_TRY(matmul(ctx, g.x, g.rows, *g.w, g.y));
      if (stats)
        ++stats->dense_experts;
    } else {
      grouped.push_back(&g);
    }
  }
  if (grouped.empty())
    return {};
  if (stats)
    stats->grouped_experts += grouped.size();

  dtype type = first->type;
  std::size_t n_out = first->rows, k_in = first->cols, count = grouped.size();
  MOERT_TRY(check_int(n_out, "GEMM output features"));
  MOERT_TRY(check_int(k_in, "GEMM input features"));
  std::size_t total_rows = 0;
  for (const expert_gemm* g : grouped) {
    MOERT_TRY(check_int(g->rows, "GEMM rows"));
    total_rows += g->rows;
  }

  // 16-bit weights: cuBLAS's grouped GEMM takes A, B and C of one type, so the activations are
  // rounded to the weight type and the outputs come back 16-bit and are widened (one more
  // rounding than the dense path; within the bf16 tolerance).
  std::byte* x16 = nullptr;
  std::byte* y16 = nullptr;
  if (type != dtype::f32) {
    auto xs = ctx.scratch(slot_x16, total_rows * k_in * 2);
    if (!xs)
      return xs.err();
    auto ys = ctx.scratch(slot_y16, total_rows * n_out * 2);
    if (!ys)
      return ys.err();
    x16 = static_cast<std::byte*>(*xs);
    y16 = static_cast<std::byte*>(*ys);
  }
  std::vector<const void*> ptrs(3 * count);
  std::vector<int> m(count, int(n_out)), n(count), k(count, int(k_in)), group_size(count, 1);
  std::vector<int> lda(count, int(k_in)), ldb(count, int(k_in)), ldc(count, int(n_out));
  std::vector<cublasOperation_t> trans_a(count, CUBLAS_OP_T), trans_b(count, CUBLAS_OP_N);
  std::vector<float> alpha(count, 1.0f), beta(count, 0.0f);
  std::size_t row = 0;
  for (std::size_t i = 0; i < count; ++i) {
    const expert_gemm& g = *grouped[i];
    n[i] = int(g.rows);
    ptrs[i] = g.w->data.data();
    if (type == dtype::f32) {
      ptrs[count + i] = g.x;
      ptrs[2 * count + i] = g.y;
    } else {
      std::byte* xi = x16 + row * k_in * 2;
      MOERT_CUDA_TRY(narrow(type, g.x, g.rows * k_in, xi, ctx.stream()));
      ptrs[count + i] = xi;
      ptrs[2 * count + i] = y16 + row * n_out * 2;
    }
    row += g.rows;
  }
  // cuBLAS reads the pointer arrays from device memory when the GEMM runs; `ptrs` dies on
  // return, so they travel through the context's pinned staging.
  auto dev_ptrs = ctx.stage(ptrs.data(), ptrs.size() * sizeof(void*));
  if (!dev_ptrs)
    return dev_ptrs.err();
  auto* a_arr = static_cast<const void* const*>(*dev_ptrs);
  cudaDataType_t t = cuda_type(type);
  MOERT_CUBLAS_TRY(cublasGemmGroupedBatchedEx(
      ctx.cublas(), trans_a.data(), trans_b.data(), m.data(), n.data(), k.data(), alpha.data(), a_arr, t,
      lda.data(), a_arr + count, t, ldb.data(), beta.data(), const_cast<void* const*>(a_arr + 2 * count), t,
      ldc.data(), int(count), group_size.data(), CUBLAS_COMPUTE_32F));
  if (type != dtype::f32) {
    row = 0;
    for (const expert_gemm* g : grouped) {
      MOERT_CUDA_TRY(widen(type, y16 + row * n_out * 2, g->rows * n_out, g->y, ctx.stream()));
      row += g->rows;
    }
  }
  return {};
}

// -- calibration -------------------------------------------------------------------------------

double gemm_timing::tflops(const expert_gemm_shape& s, std::size_t rows, double ms) {
  if (ms <= 0.0)
    return 0.0;
  return 2.0 * double(rows) * double(s.n) * double(s.k) * double(s.num_experts) / (ms * 1e-3) / 1e12;
}

namespace {

// Uniform values in [-scale, scale) from a fixed LCG, so calibration inputs are reproducible.
std::vector<float> random_floats(std::size_t n, float scale, std::uint64_t seed) {
  std::vector<float> out(n);
  std::uint64_t s = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (float& v : out) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    v = (float(s >> 40) / float(1ull << 24) * 2.0f - 1.0f) * scale;
  }
  return out;
}

struct event_pair {
  cudaEvent_t begin = nullptr, end = nullptr;
  ~event_pair() {
    if (begin)
      cudaEventDestroy(begin);
    if (end)
      cudaEventDestroy(end);
  }
};

struct stats3 {
  double median, spread;
};

stats3 summarize(std::vector<double> ms) {
  std::sort(ms.begin(), ms.end());
  double med = ms[ms.size() / 2];
  return {med, med > 0.0 ? (ms.back() - ms.front()) / med : 0.0};
}

}  // namespace

result<std::vector<gemm_timing>> time_expert_gemms(context& ctx, const expert_gemm_shape& shape,
                                                   std::span<const std::size_t> rows_grid, int reps) {
  if (shape.n == 0 || shape.k == 0 || shape.num_experts == 0 || reps < 1 || rows_grid.empty())
    return make_error(error_code::invalid_argument,
                      "time_expert_gemms: n, k, num_experts, reps and the rows grid must be positive");
  MOERT_TRY(ctx.make_current());
  std::size_t max_rows = *std::max_element(rows_grid.begin(), rows_grid.end());
  std::size_t e = shape.num_experts;

  // Weights: random f32 uploaded, then narrowed on the device to the tested type.
  std::vector<device_matrix> weights(e);
  {
    std::vector<float> host = random_floats(shape.n * shape.k, 0.05f, 1);
    auto staging = device_buffer::allocate(ctx.device(), host.size() * sizeof(float));
    if (!staging)
      return staging.err();
    MOERT_TRY(ctx.upload(staging->data(), host.data(), host.size() * sizeof(float)));
    for (device_matrix& w : weights) {
      w.type = shape.type;
      w.rows = shape.n;
      w.cols = shape.k;
      auto buf = device_buffer::allocate(ctx.device(), w.num_bytes());
      if (!buf)
        return buf.err();
      w.data = std::move(*buf);
      if (shape.type == dtype::f32)
        MOERT_TRY(ctx.copy_device(w.data.data(), staging->data(), w.num_bytes()));
      else
        MOERT_CUDA_TRY(narrow(shape.type, staging->as<float>(), shape.n * shape.k, w.data.data(), ctx.stream()));
    }
    MOERT_TRY(ctx.synchronize());
  }
  auto x = device_buffer::allocate(ctx.device(), e * max_rows * shape.k * sizeof(float));
  if (!x)
    return x.err();
  auto y = device_buffer::allocate(ctx.device(), e * max_rows * shape.n * sizeof(float));
  if (!y)
    return y.err();
  {
    std::vector<float> host = random_floats(e * max_rows * shape.k, 1.0f, 2);
    MOERT_TRY(ctx.upload(x->data(), host.data(), host.size() * sizeof(float)));
    MOERT_TRY(ctx.synchronize());
  }

  event_pair ev;
  MOERT_CUDA_TRY(cudaEventCreate(&ev.begin));
  MOERT_CUDA_TRY(cudaEventCreate(&ev.end));
  auto time_once = [&](auto&& run) -> result<double> {
    MOERT_CUDA_TRY(cudaEventRecord(ev.begin, ctx.stream()));
    MOERT_TRY(run());
    MOERT_CUDA_TRY(cudaEventRecord(ev.end, ctx.stream()));
    MOERT_TRY(ctx.synchronize());
    float ms = 0.0f;
    MOERT_CUDA_TRY(cudaEventElapsedTime(&ms, ev.begin, ev.end));
    return double(ms);
  };
  auto measure = [&](auto&& run) -> result<stats3> {
    for (int i = 0; i < 2; ++i) {  // warm-up: cuBLAS heuristics, scratch growth
      auto t = time_once(run);
      if (!t)
        return t.err();
    }
    std::vector<double> ms;
    for (int i = 0; i < reps; ++i) {
      auto t = time_once(run);
      if (!t)
        return t.err();
      ms.push_back(*t);
    }
    return summarize(std::move(ms));
  };

  std::vector<gemm_timing> out;
  for (std::size_t rows : rows_grid) {
    std::vector<expert_gemm> batch(e);
    for (std::size_t i = 0; i < e; ++i)
      batch[i] = {&weights[i], x->as<float>() + i * rows * shape.k, y->as<float>() + i * rows * shape.n, rows};
    auto grouped = measure([&] { return run_expert_gemms(ctx, batch, gemm_switch::always(gemm_kind::grouped)); });
    if (!grouped)
      return grouped.err();
    auto dense = measure([&] { return run_expert_gemms(ctx, batch, gemm_switch::always(gemm_kind::dense)); });
    if (!dense)
      return dense.err();
    auto peak = measure([&] { return matmul(ctx, x->as<float>(), e * rows, weights[0], y->as<float>()); });
    if (!peak)
      return peak.err();
    out.push_back({rows, grouped->median, dense->median, peak->median, grouped->spread, dense->spread});
  }
  return out;
}

result<gemm_switch> fit_gemm_switch(std::span<const gemm_timing> sweep, std::string source) {
  if (sweep.empty())
    return make_error(error_code::invalid_argument, "fit_gemm_switch: empty sweep");
  for (std::size_t i = 1; i < sweep.size(); ++i)
    if (sweep[i].rows <= sweep[i - 1].rows)
      return make_error(error_code::invalid_argument, "fit_gemm_switch: sweep rows must ascend (" +
                                                          std::to_string(sweep[i - 1].rows) + " then " +
                                                          std::to_string(sweep[i].rows) + ")");
  std::size_t first_dense = sweep.size();  // dense no slower from here to the end
  for (std::size_t i = sweep.size(); i-- > 0;) {
    if (sweep[i].dense_ms > sweep[i].grouped_ms)
      break;
    first_dense = i;
  }
  gemm_switch sw;
  sw.calibrated = true;
  sw.source = std::move(source);
  sw.dense_min_rows = first_dense == sweep.size() ? std::numeric_limits<std::size_t>::max() : sweep[first_dense].rows;
  return sw;
}

}  // namespace moert::cuda
