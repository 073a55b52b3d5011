#include "gpu/cpu/gemm.hpp"

#include "gpu/cpu/gemm_kernels.hpp"
#include "gpu/cpu/thread_pool.hpp"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

namespace moert::cpu {

namespace {

constexpr std::size_t pw = packed_matrix::panel_width;
// Panels per parallel_for task. Kernels group 1-4 panels per register tile, so a thread's
// range ends in at most one narrower tile; finer tasks would balance little better.
constexpr std::size_t task_panels = 4;

gemm_kernel best_supported() {
  if (gemm_kernel_supported(gemm_kernel::avx512))
    return gemm_kernel::avx512;
  if (gemm_kernel_supported(gemm_kernel::avx2))
    return gemm_kernel::avx2;
  return gemm_kernel::scalar;
}

gemm_kernel pick_kernel() {
  gemm_kernel best = best_supported();
  const char* env = std::getenv("MOERT_GEMM_KERNEL");
  if (env == nullptr)
    return best;
  for (gemm_kernel k : {gemm_kernel::scalar, gemm_kernel::avx2, gemm_kernel::avx512})
    if (std::strcmp(env, to_string(k)) == 0 && k < best)
      return k;
  return best;
}

}  // namespace

void packed_matrix::aligned_free::operator()(float* p) const {
  std::free(p);
}

packed_matrix packed_matrix::pack(const float* w, std::size_t n, std::size_t k) {
  packed_matrix m;
  m.rows_ = n;
  m.cols_ = k;
  std::size_t bytes = m.num_bytes();
  if (bytes == 0)
    return m;
  // aligned_alloc wants a size that is a multiple of the alignment; panels are 64 bytes wide.
  m.data_.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
  if (!m.data_)
    throw std::bad_alloc{};
  float* dst = m.data_.get();
  for (std::size_t p = 0; p < m.num_panels(); ++p)
    for (std::size_t kk = 0; kk < k; ++kk)
      for (std::size_t c = 0; c < pw; ++c) {
        std::size_t row = p * pw + c;
        *dst++ = row < n ? w[row * k + kk] : 0.0f;
      }
  return m;
}

float packed_matrix::at(std::size_t n, std::size_t k) const {
  return panel(n / pw)[k * pw + n % pw];
}

const char* to_string(gemm_kernel kernel) {
  switch (kernel) {
  case gemm_kernel::avx512:
    return "avx512";
  case gemm_kernel::avx2:
    return "avx2";
  case gemm_kernel::scalar:
    break;
  }
  return "scalar";
}

bool gemm_kernel_supported(gemm_kernel kernel) {
  switch (kernel) {
  case gemm_kernel::avx512:
    return __builtin_cpu_supports("avx512f");
  case gemm_kernel::avx2:
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  case gemm_kernel::scalar:
    break;
  }
  return true;
}

gemm_kernel selected_gemm_kernel() {
  static const gemm_kernel kernel = pick_kernel();
  return kernel;
}

// The reference the SIMD kernels must match bit for bit: std::fma never rounds the
// product, exactly like vfmadd, and -ffp-contract=off keeps the compiler from fusing
// anything else.
void matmul_panels_scalar(const gemm_args& a, std::size_t panel_begin, std::size_t panel_end) {
  for (std::size_t m = 0; m < a.num_rows; ++m) {
    const float* x = a.x + m * a.k;
    for (std::size_t p = panel_begin; p < panel_end; ++p) {
      const float* w = a.w + p * a.k * pw;
      float acc[pw] = {};
      for (std::size_t kk = 0; kk < a.k; ++kk)
        for (std::size_t c = 0; c < pw; ++c)
          acc[c] = std::fma(x[kk], w[kk * pw + c], acc[c]);
      std::size_t cols = a.n - p * pw < pw ? a.n - p * pw : pw;
      std::memcpy(a.y + m * a.n + p * pw, acc, cols * sizeof(float));
    }
  }
}

void matmul_with(gemm_kernel kernel, const float* x, std::size_t num_rows,
                 const packed_matrix& w, float* y, thread_pool* pool) {
  if (num_rows == 0 || w.rows() == 0)
    return;
  auto* run = kernel == gemm_kernel::avx512 ? &matmul_panels_avx512
              : kernel == gemm_kernel::avx2 ? &matmul_panels_avx2
                                            : &matmul_panels_scalar;
  const gemm_args args{x, num_rows, w.cols() == 0 ? nullptr : w.panel(0), w.cols(), w.rows(), y};
  const std::size_t panels = w.num_panels();
  const std::size_t tasks = (panels + task_panels - 1) / task_panels;
  auto body = [&](std::size_t begin, std::size_t end) {
    std::size_t panel_end = end * task_panels < panels ? end * task_panels : panels;
    run(args, begin * task_panels, panel_end);
  };
  parallel_for_if_worth(pool, num_rows * w.rows() * w.cols(), tasks, body);
}

void matmul(const float* x, std::size_t num_rows, const packed_matrix& w, float* y,
            thread_pool* pool) {
  matmul_with(selected_gemm_kernel(), x, num_rows, w, y, pool);
}

const char* matmul_kernel_name() {
  return to_string(selected_gemm_kernel());
}

}  // namespace moert::cpu
