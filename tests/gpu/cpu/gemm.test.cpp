#include <catch2/catch.hpp>

#include "core/rng.hpp"
#include "gpu/cpu/gemm.hpp"
#include "gpu/cpu/gemm_kernels.hpp"
#include "gpu/cpu/thread_pool.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <span>
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

// Random 16-bit weights of `type`. bf16: the top half of a random f32 in [-1, 1]. f16: random
// sign and mantissa, exponents spanning subnormals to ±2^5, so the widening is tested on
// every class of finite value.
std::vector<std::uint16_t> random_half_bits(dtype type, std::size_t count, std::uint64_t seed) {
  rng gen{seed};
  std::vector<std::uint16_t> v(count);
  for (auto& bits : v) {
    if (type == dtype::bf16) {
      float f = gen.uniform(-1.0f, 1.0f);
      std::uint32_t u;
      std::memcpy(&u, &f, sizeof u);
      bits = std::uint16_t(u >> 16);
    } else {
      std::uint64_t r = gen.next_u64();
      std::uint16_t exponent = std::uint16_t(r % 8 == 0 ? 0 : 5 + (r >> 3) % 16);  // 0 or 5..20
      bits = std::uint16_t(((r >> 8) & 0x8000u) | (exponent << 10) | ((r >> 20) & 0x3ffu));
    }
  }
  return v;
}

std::vector<float> upcast(dtype type, const std::vector<std::uint16_t>& bits) {
  std::vector<float> out(bits.size());
  convert_to_f32(type, bits.data(), bits.size(), out.data());
  return out;
}

}  // namespace

TEST_CASE("packed_matrix::at returns the packed values", "[gemm]") {
  const std::size_t shapes[][2] = {{1, 1}, {16, 3}, {17, 5}, {45, 33}, {64, 7}};
  for (auto [n, k] : shapes) {
    auto w = random_floats(n * k, 1);
    auto packed = packed_matrix::pack(w.data(), n, k);
    CHECK(packed.rows() == n);
    CHECK(packed.cols() == k);
    CHECK(packed.type() == dtype::f32);
    CHECK(reinterpret_cast<std::uintptr_t>(packed.panel(0)) % 64 == 0);
    for (std::size_t r = 0; r < n; ++r)
      for (std::size_t c = 0; c < k; ++c)
        REQUIRE(packed.at(r, c) == w[r * k + c]);
    // Padding past N is zero, so padded lanes never produce NaN or overflow.
    std::size_t panels = packed.num_panels();
    for (std::size_t r = n; r < panels * packed_matrix::panel_width; ++r)
      for (std::size_t i = 0; i < k; ++i)
        REQUIRE(packed.at(r, i) == 0.0f);
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

TEST_CASE("a decode-sized matmul spreads over the pool, a router-sized one does not", "[gemm]") {
  // One row through a 1024 x 1024 weight is 4 MiB of weight traffic: worth both cores even
  // though it is only 1 M multiply-adds. A 1024 x 32 router is not.
  thread_pool two{2};
  const std::size_t k = 1024;
  auto x = random_floats(k, 11);
  auto big = packed_matrix::pack(random_floats(1024 * k, 12).data(), 1024, k);
  auto router = packed_matrix::pack(random_floats(32 * k, 13).data(), 32, k);
  std::vector<float> y(1024);
  std::uint64_t before = two.spread_jobs();
  matmul(x.data(), 1, big, y.data(), &two);
  CHECK(two.spread_jobs() == before + 1);
  matmul(x.data(), 1, router, y.data(), &two);
  CHECK(two.spread_jobs() == before + 1);
}

TEST_CASE("matmul_batch gives each entry the bits of its own matmul, with one pool job", "[gemm]") {
  thread_pool two{2}, three{3};
  const std::size_t k = 512;  // enough work in all to be spread
  const std::size_t shapes[][2] = {{3, 400}, {1, 17}, {0, 64}, {5, 300}, {2, 1}};  // rows, n
  std::vector<packed_matrix> weights;
  std::vector<std::vector<float>> xs, want, got;
  for (std::size_t i = 0; i < std::size(shapes); ++i) {
    auto [m, n] = shapes[i];
    weights.push_back(packed_matrix::pack(random_floats(n * k, 20 + i).data(), n, k));
    xs.push_back(random_floats(m * k, 30 + i));
    want.push_back(reference(xs[i], random_floats(n * k, 20 + i), m, n, k));
  }
  for (thread_pool* pool : {static_cast<thread_pool*>(nullptr), &two, &three}) {
    std::vector<matmul_entry> batch;
    got.assign(std::size(shapes), {});
    for (std::size_t i = 0; i < std::size(shapes); ++i) {
      got[i].assign(want[i].size(), std::nanf(""));
      batch.push_back({&weights[i], xs[i].data(), shapes[i][0], got[i].data()});
    }
    std::uint64_t before = pool ? pool->spread_jobs() : 0;
    matmul_batch(batch, pool);
    if (pool)
      CHECK(pool->spread_jobs() == before + 1);
    for (std::size_t i = 0; i < std::size(shapes); ++i) {
      INFO("entry " << i << " threads " << (pool ? pool->num_threads() : 1));
      REQUIRE(same_bits(got[i].data(), want[i].data(), want[i].size()));
    }
  }
}

TEST_CASE("matmul_batch splits a batch by work, not by panel count, and runs every panel once", "[gemm]") {
  // One busy expert and seven with a row each, as a prefill's routing often gives: by panel
  // count the first thread would get the busy expert and more (~9x the other's work).
  const std::size_t k = 8;
  std::vector<packed_matrix> weights;
  std::vector<matmul_entry> batch;
  std::vector<float> x(64 * k), y(64 * 1024);
  for (std::size_t i = 0; i < 8; ++i) {
    weights.push_back(packed_matrix::pack(random_floats(1024 * k, 50 + i).data(), 1024, k));
    batch.push_back({&weights[i], x.data(), i == 0 ? 64u : 1u, y.data()});
  }
  batch.push_back({&weights[0], x.data(), 0, y.data()});  // no rows: dropped
  const matmul_plan plan{batch};
  REQUIRE(plan.num_entries() == 8);
  for (std::size_t threads : {1, 2, 3, 5}) {
    INFO(threads << " threads");
    // thread_pool's split: contiguous ranges, sizes differing by at most one.
    std::vector<std::size_t> runs(8 * 64, 0), work(threads, 0);
    std::size_t base = plan.units() / threads, extra = plan.units() % threads, begin = 0;
    for (std::size_t t = 0; t < threads; ++t) {
      std::size_t end = begin + base + (t < extra ? 1 : 0);
      plan.for_each_in(begin, end, [&](const gemm_args&, std::size_t p0, std::size_t p1, std::size_t entry) {
        for (std::size_t p = p0; p < p1; ++p)
          ++runs[entry * 64 + p];
        work[t] += (p1 - p0) * plan.panel_cost(entry);
      });
      begin = end;
    }
    CHECK(std::all_of(runs.begin(), runs.end(), [](std::size_t n) { return n == 1; }));
    auto [lo, hi] = std::minmax_element(work.begin(), work.end());
    CHECK(*hi - *lo <= plan.panel_cost(0));  // within one panel of the busiest entry
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

namespace moert::cpu {

TEST_CASE("16-bit weights stay 16-bit and give the bits of their f32 upcast", "[gemm][bf16]") {
  thread_pool two{2}, three{3};
  for (dtype type : {dtype::bf16, dtype::f16}) {
    rng shapes{12};
    for (int trial = 0; trial < 30; ++trial) {
      std::size_t m = 1 + shapes.next_u64() % 40;
      std::size_t n = 1 + shapes.next_u64() % 100;
      std::size_t k = 1 + shapes.next_u64() % 700;
      if (trial == 0)
        k = 1;
      if (trial == 1)
        n = 16;
      if (trial == 2)
        k = 1500;  // more than one K block in the SIMD kernels
      if (trial == 3)
        m = 64;  // several row tiles
      auto x = random_floats(m * k, 300 + trial);
      auto bits = random_half_bits(type, n * k, 400 + trial);
      auto wide = upcast(type, bits);
      auto half = packed_matrix::pack(type, bits.data(), n, k);
      auto full = packed_matrix::pack(wide.data(), n, k);
      REQUIRE(half.type() == type);
      REQUIRE(half.num_bytes() * 2 == full.num_bytes());
      auto want = reference(x, wide, m, n, k);
      for (gemm_kernel kernel : available_kernels()) {
        INFO(safetensors_name(type) << " kernel " << to_string(kernel) << " m=" << m << " n=" << n
                                    << " k=" << k);
        auto got = run(kernel, x, m, half);
        REQUIRE(same_bits(got.data(), want.data(), want.size()));
        REQUIRE(same_bits(run(kernel, x, m, full).data(), want.data(), want.size()));
        if (trial < 6) {
          REQUIRE(same_bits(run(kernel, x, m, half, &two).data(), want.data(), want.size()));
          REQUIRE(same_bits(run(kernel, x, m, half, &three).data(), want.data(), want.size()));
        }
      }
    }
  }
}

TEST_CASE("a row's bits do not depend on its batch with 16-bit weights", "[gemm][bf16]") {
  const std::size_t n = 200, k = 777, batch = 37;
  auto x = random_floats(batch * k, 13);
  for (dtype type : {dtype::bf16, dtype::f16}) {
    auto bits = random_half_bits(type, n * k, 14);
    auto packed = packed_matrix::pack(type, bits.data(), n, k);
    for (gemm_kernel kernel : available_kernels()) {
      INFO(safetensors_name(type) << " kernel " << to_string(kernel));
      auto all = run(kernel, x, batch, packed);
      for (std::size_t r = 0; r < batch; ++r) {
        std::vector<float> row(x.begin() + r * k, x.begin() + (r + 1) * k);
        REQUIRE(same_bits(run(kernel, row, 1, packed).data(), all.data() + r * n, n));
      }
    }
  }
}

TEST_CASE("pack joins parts, reads strided sources and upcasts exactly", "[gemm][bf16]") {
  const std::size_t k = 37, top = 21, bottom = 30;
  auto a = random_half_bits(dtype::bf16, top * k, 15);
  auto b = random_half_bits(dtype::bf16, k * bottom, 16);  // stored transposed: [k][bottom]
  const matrix_part parts[] = {{a.data(), dtype::bf16, top, k, 1},
                               {b.data(), dtype::bf16, bottom, 1, bottom}};
  auto joined = packed_matrix::pack(dtype::bf16, k, parts);
  auto widened = packed_matrix::pack(dtype::f32, k, parts);
  REQUIRE(joined.rows() == top + bottom);
  CHECK(joined.type() == dtype::bf16);
  CHECK(widened.type() == dtype::f32);
  for (std::size_t r = 0; r < top + bottom; ++r)
    for (std::size_t c = 0; c < k; ++c) {
      float want = r < top ? bf16_to_f32(a[r * k + c]) : bf16_to_f32(b[c * bottom + (r - top)]);
      REQUIRE(joined.at(r, c) == want);
      REQUIRE(widened.at(r, c) == want);
    }
  // Storing f32 weights as 16-bit would round them: refused rather than done silently.
  std::vector<float> f(k);
  const matrix_part narrow{f.data(), dtype::f32, 1, k};
  CHECK_THROWS(packed_matrix::pack(dtype::bf16, k, std::span{&narrow, 1}));
}

}  // namespace moert::cpu
