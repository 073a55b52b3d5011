#include "gpu/cpu/gemm.hpp"

#include "gpu/cpu/gemm_kernels.hpp"
#include "gpu/cpu/thread_pool.hpp"
#include "gpu/cpu/weight_memory.hpp"
#include "gpu/work_units.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace moert::cpu {

namespace {

constexpr std::size_t pw = packed_matrix::panel_width;
using gpu::weight_stream_rows;

gemm_kernel best_supported() {
  if (gemm_kernel_supported(gemm_kernel::avx512))
    return gemm_kernel::avx512;
  if (gemm_kernel_supported(gemm_kernel::avx2))
    return gemm_kernel::avx2;
  return gemm_kernel::scalar;
}

// Copies part's rows into the panels from output row `row0` on. `out` is the element type
// written: uint32_t / uint16_t copy the stored bits, float upcasts them.
template <class out>
void copy_rows(const matrix_part& part, std::byte* panels, std::size_t row0, std::size_t k) {
  const std::size_t in_elem = size_of(part.type);
  const auto* src = static_cast<const std::byte*>(part.data);
  const std::size_t in_step = part.col_stride * in_elem;
  for (std::size_t r = 0; r < part.rows; ++r) {
    const std::size_t row = row0 + r;
    std::byte* dst = panels + ((row / pw) * k * pw + row % pw) * sizeof(out);
    const std::byte* in = src + r * part.row_stride * in_elem;
    for (std::size_t kk = 0; kk < k; ++kk, in += in_step, dst += pw * sizeof(out)) {
      out v;
      if constexpr (std::is_same_v<out, float>)
        convert_to_f32(part.type, in, 1, &v);
      else
        std::memcpy(&v, in, sizeof v);
      std::memcpy(dst, &v, sizeof v);
    }
  }
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

packed_matrix packed_matrix::pack(const float* w, std::size_t n, std::size_t k) {
  return pack(dtype::f32, w, n, k);
}

packed_matrix packed_matrix::pack(dtype type, const void* w, std::size_t n, std::size_t k) {
  const matrix_part whole{w, type, n, k};
  return pack(type, k, std::span{&whole, 1});
}

packed_matrix packed_matrix::pack(dtype type, std::size_t k, std::span<const matrix_part> parts) {
  packed_matrix m;
  m.type_ = type;
  m.cols_ = k;
  for (const matrix_part& part : parts) {
    // A narrowing conversion would round, and then the bits would no longer be the stored ones.
    if (part.type != type && type != dtype::f32)
      throw std::invalid_argument("packed_matrix::pack: cannot store " +
                                  std::string(safetensors_name(part.type)) + " weights as " +
                                  std::string(safetensors_name(type)));
    m.rows_ += part.rows;
  }
  const std::size_t bytes = m.num_bytes();
  if (bytes == 0)
    return m;
  m.data_ = allocate_weight_bytes(bytes);  // zeroed: padding rows past N stay +0

  std::size_t row = 0;  // first output row of the current part
  for (const matrix_part& part : parts) {
    if (part.type == type && type == dtype::f32)
      copy_rows<std::uint32_t>(part, m.data_.get(), row, k);
    else if (part.type == type)
      copy_rows<std::uint16_t>(part, m.data_.get(), row, k);
    else
      copy_rows<float>(part, m.data_.get(), row, k);
    row += part.rows;
  }
  return m;
}

float packed_matrix::at(std::size_t n, std::size_t k) const {
  float out;
  const std::byte* p = static_cast<const std::byte*>(panel(n / pw)) + (k * pw + n % pw) * size_of(type_);
  convert_to_f32(type_, p, 1, &out);
  return out;
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
    // F16C widens f16 weights; every AVX2 + FMA CPU has it, but say so rather than assume.
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  case gemm_kernel::scalar:
    break;
  }
  return true;
}

gemm_kernel selected_gemm_kernel() {
  static const gemm_kernel kernel = pick_kernel();
  return kernel;
}

namespace {

float widen(float w) {
  return w;
}
float widen(bf16_bits w) {
  return bf16_to_f32(w.bits);
}
float widen(f16_bits w) {
  return f16_to_f32(w.bits);
}

// The reference the SIMD kernels must match bit for bit: std::fma never rounds the
// product, exactly like vfmadd, and -ffp-contract=off keeps the compiler from fusing
// anything else. 16-bit weights go through the same exact conversions as the loader's upcast.
template <class welem>
void matmul_panels_scalar_typed(const gemm_args& a, std::size_t panel_begin, std::size_t panel_end) {
  for (std::size_t m = 0; m < a.num_rows; ++m) {
    const float* x = a.x + m * a.k;
    for (std::size_t p = panel_begin; p < panel_end; ++p) {
      const welem* w = static_cast<const welem*>(a.w) + p * a.k * pw;
      float acc[pw] = {};
      for (std::size_t kk = 0; kk < a.k; ++kk)
        for (std::size_t c = 0; c < pw; ++c)
          acc[c] = std::fma(x[kk], widen(w[kk * pw + c]), acc[c]);
      std::size_t cols = a.n - p * pw < pw ? a.n - p * pw : pw;
      std::memcpy(a.y + m * a.n + p * pw, acc, cols * sizeof(float));
    }
  }
}

}  // namespace

void matmul_panels_scalar(const gemm_args& a, std::size_t panel_begin, std::size_t panel_end) {
  switch (a.w_type) {
  case dtype::f32:
    return matmul_panels_scalar_typed<float>(a, panel_begin, panel_end);
  case dtype::bf16:
    return matmul_panels_scalar_typed<bf16_bits>(a, panel_begin, panel_end);
  case dtype::f16:
    return matmul_panels_scalar_typed<f16_bits>(a, panel_begin, panel_end);
  }
}

matmul_plan::matmul_plan(std::span<const matmul_entry> batch) {
  entries_.reserve(batch.size());
  for (const matmul_entry& e : batch) {
    if (e.num_rows == 0 || e.w->rows() == 0)
      continue;
    const gemm_args args{e.x, e.num_rows, e.w->cols() == 0 ? nullptr : e.w->panel(0), e.w->type(), e.w->cols(),
                         e.w->rows(), e.y};
    const std::size_t cost = e.num_rows + weight_stream_rows;
    entries_.push_back({args, units_, e.w->num_panels(), cost});
    units_ += e.w->num_panels() * cost;
    work_ += matmul_work(e.num_rows, e.w->rows(), e.w->cols());
  }
}

namespace {

using panels_fn = void (*)(const gemm_args&, std::size_t, std::size_t);

panels_fn panels_of(gemm_kernel kernel) {
  return kernel == gemm_kernel::avx512 ? &matmul_panels_avx512
         : kernel == gemm_kernel::avx2 ? &matmul_panels_avx2
                                       : &matmul_panels_scalar;
}

// matmul() of every entry with `kernel`, as one parallel_for over the plan's cost units.
void run_entries(gemm_kernel kernel, std::span<const matmul_entry> batch, thread_pool* pool) {
  panels_fn run = panels_of(kernel);
  const matmul_plan plan{batch};
  if (plan.units() == 0)
    return;
  parallel_for_if_worth(pool, plan.work(), plan.units(), [&](std::size_t begin, std::size_t end) {
    plan.for_each_in(begin, end, [&](const gemm_args& a, std::size_t p0, std::size_t p1) { run(a, p0, p1); });
  });
}

}  // namespace

void matmul_with(gemm_kernel kernel, const float* x, std::size_t num_rows,
                 const packed_matrix& w, float* y, thread_pool* pool) {
  const matmul_entry one{&w, x, num_rows, y};
  run_entries(kernel, {&one, 1}, pool);
}

std::size_t matmul_work(std::size_t num_rows, std::size_t n, std::size_t k) {
  return (num_rows + weight_stream_rows) * n * k;
}

void matmul_batch(std::span<const matmul_entry> batch, thread_pool* pool) {
  run_entries(selected_gemm_kernel(), batch, pool);
}

void matmul(const float* x, std::size_t num_rows, const packed_matrix& w, float* y,
            thread_pool* pool) {
  matmul_with(selected_gemm_kernel(), x, num_rows, w, y, pool);
}

const char* matmul_kernel_name() {
  return to_string(selected_gemm_kernel());
}

}  // namespace moert::cpu
