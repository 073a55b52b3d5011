#include <catch2/catch.hpp>

#include "core/rng.hpp"
#include "gpu/cpu/gemm.hpp"
#include "gpu/cpu/gemm_kernels.hpp"
#include "gpu/cpu/thread_pool.hpp"

#include <cmath>
#include <cstring>
#include <vector>

namespace moert::cpu {

namespace {

std::vector<float> random_floats(std::size_t count, std::uint64_t seed) {
  rng gen{seed};
  std::vector<float> v(count);
  for (float& f : v)
    f = gen.uniform(-1.0f, 1.0f);
  return v;
}

// The definition of the result: one fma chain per output, k ascending, from +0.0f.
std::vector<float> reference(const std::vector<float>& x, const std::vector<float>& w,
                             std::size_t m, std::size_t n, std::size_t k) {
  std::vector<float> y(m * n);
  for (std::size_t r = 0; r < m; ++r)
    for (std::size_t c = 0; c < n; ++c) {
      float acc = 0.0f;
      for (std::size_t i = 0; i < k; ++i)
        acc = std::fma(x[r * k + i], w[c * k + i], acc);
      y[r * n + c] = acc;
    }
  return y;
}

// Bitwise comparison: -0.0f vs +0.0f or a NaN payload must count as a difference too.
bool same_bits(const float* a, const float* b, std::size_t count) {
  return std::memcmp(a, b, count * sizeof(float)) == 0;
}

std::vector<gemm_kernel> available_kernels() {
  std::vector<gemm_kernel> kernels;
  for (gemm_kernel k : {gemm_kernel::scalar, gemm_kernel::avx2, gemm_kernel::avx512})
    if (gemm_kernel_supported(k))
      kernels.push_back(k);
  return kernels;
}

std::vector<float> run(gemm_kernel kernel, const std::vector<float>& x, std::size_t m,
                       const packed_matrix& w, thread_pool* pool = nullptr) {
  // NaN fill, so a column a kernel forgets to write cannot pass as a zero.
  std::vector<float> y(m * w.rows(), std::nanf(""));
  matmul_with(kernel, x.data(), m, w, y.data(), pool);
  return y;
}

}  // namespace

TEST_CASE("packed_matrix::at returns the packed values", "[gemm]") {
  const std::size_t shapes[][2] = {{1, 1}, {16, 3}, {17, 5}, {45, 33}, {64, 7}};
  for (auto [n, k] : shapes) {
    auto w = random_floats(n * k, 1);
    auto packed = packed_matrix::pack(w.data(), n, k);
    CHECK(packed.rows() == n);
    CHECK(packed.cols() == k);
    CHECK(reinterpret_cast<std::uintptr_t>(packed.panel(0)) % 64 == 0);
    for (std::size_t r = 0; r < n; ++r)
      for (std::size_t c = 0; c < k; ++c)
        REQUIRE(packed.at(r, c) == w[r * k + c]);
    // Padding past N is zero, so padded lanes never produce NaN or overflow.
    std::size_t panels = packed.num_panels();
    for (std::size_t c = n; c < panels * packed_matrix::panel_width; ++c)
      for (std::size_t i = 0; i < k; ++i)
        REQUIRE(packed.panel(panels - 1)[i * packed_matrix::panel_width +
                                         c % packed_matrix::panel_width] == 0.0f);
  }
}

TEST_CASE("every kernel matches the fma-chain reference bit for bit", "[gemm]") {
  rng shapes{2};
  for (int trial = 0; trial < 40; ++trial) {
    std::size_t m = 1 + shapes.next_u64() % 40;
    std::size_t n = 1 + shapes.next_u64() % 100;
    std::size_t k = 1 + shapes.next_u64() % 700;
    if (trial == 0)
      k = 1;
    if (trial == 1)
      n = 16;
    if (trial == 2)
      k = 1500;  // more than one K block in the SIMD kernels
    auto x = random_floats(m * k, 100 + trial);
    auto w = random_floats(n * k, 200 + trial);
    auto want = reference(x, w, m, n, k);
    auto packed = packed_matrix::pack(w.data(), n, k);
    for (gemm_kernel kernel : available_kernels()) {
      INFO("kernel " << to_string(kernel) << " m=" << m << " n=" << n << " k=" << k);
      auto got = run(kernel, x, m, packed);
      REQUIRE(same_bits(got.data(), want.data(), want.size()));
    }
  }
}

TEST_CASE("a row's bits do not depend on the batch it is in", "[gemm]") {
  const std::size_t n = 200, k = 777, batch = 37;
  auto x = random_floats(batch * k, 3);
  auto w = random_floats(n * k, 4);
  auto packed = packed_matrix::pack(w.data(), n, k);
  for (gemm_kernel kernel : available_kernels()) {
    INFO("kernel " << to_string(kernel));
    auto full = run(kernel, x, batch, packed);
    for (std::size_t r = 0; r < batch; ++r) {
      std::vector<float> row(x.begin() + r * k, x.begin() + (r + 1) * k);
      auto alone = run(kernel, row, 1, packed);
      REQUIRE(same_bits(alone.data(), full.data() + r * n, n));
    }
    for (std::size_t r0 = 0; r0 < batch; r0 += 5) {
      std::size_t rows = batch - r0 < 5 ? batch - r0 : 5;
      std::vector<float> part(x.begin() + r0 * k, x.begin() + (r0 + rows) * k);
      auto got = run(kernel, part, rows, packed);
      REQUIRE(same_bits(got.data(), full.data() + r0 * n, rows * n));
    }
  }
}

TEST_CASE("thread count does not change the bits", "[gemm]") {
  thread_pool two{2}, three{3};
  const std::size_t shapes[][3] = {{1, 333, 513}, {37, 200, 300}, {64, 1000, 129}};
  for (auto [m, n, k] : shapes) {
    auto x = random_floats(m * k, 5);
    auto w = random_floats(n * k, 6);
    auto packed = packed_matrix::pack(w.data(), n, k);
    for (gemm_kernel kernel : available_kernels()) {
      INFO("kernel " << to_string(kernel) << " m=" << m);
      auto one = run(kernel, x, m, packed);
      REQUIRE(same_bits(run(kernel, x, m, packed, &two).data(), one.data(), one.size()));
      REQUIRE(same_bits(run(kernel, x, m, packed, &three).data(), one.data(), one.size()));
    }
  }
}

TEST_CASE("all kernels agree on large, cancelling sums", "[gemm]") {
  // Wide dynamic range makes any reassociation or double rounding show up in the bits.
  const std::size_t m = 13, n = 50, k = 2049;
  auto x = random_floats(m * k, 7);
  auto w = random_floats(n * k, 8);
  for (std::size_t i = 0; i < x.size(); i += 7)
    x[i] *= 1e6f;
  auto packed = packed_matrix::pack(w.data(), n, k);
  auto scalar = run(gemm_kernel::scalar, x, m, packed);
  REQUIRE(same_bits(scalar.data(), reference(x, w, m, n, k).data(), scalar.size()));
  for (gemm_kernel kernel : available_kernels()) {
    INFO("kernel " << to_string(kernel));
    REQUIRE(same_bits(run(kernel, x, m, packed).data(), scalar.data(), scalar.size()));
  }
}

TEST_CASE("matmul dispatches to a supported kernel", "[gemm]") {
  CHECK(gemm_kernel_supported(selected_gemm_kernel()));
  CHECK(std::strcmp(matmul_kernel_name(), to_string(selected_gemm_kernel())) == 0);
  const std::size_t m = 3, n = 20, k = 9;
  auto x = random_floats(m * k, 9);
  auto w = random_floats(n * k, 10);
  auto packed = packed_matrix::pack(w.data(), n, k);
  std::vector<float> y(m * n);
  matmul(x.data(), m, packed, y.data(), nullptr);
  CHECK(same_bits(y.data(), reference(x, w, m, n, k).data(), y.size()));
}

TEST_CASE("an empty K gives zeros", "[gemm]") {
  auto packed = packed_matrix::pack(nullptr, 20, 0);
  std::vector<float> x(2);
  for (gemm_kernel kernel : available_kernels()) {
    auto y = run(kernel, x, 2, packed);
    for (float v : y)
      REQUIRE((v == 0.0f && !std::signbit(v)));
  }
}

}  // namespace moert::cpu
