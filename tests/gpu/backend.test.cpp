// Every operation of gpu::backend, on every backend this build has and can run here
// (gpu::available_backends()), against the direct cpu kernels (gpu/cpu/gemm.hpp, ops.hpp).
// The cpu backend must give exactly their bits, and be batch-invariant (a row alone gives the
// bits it gets in a batch, with any thread count). Another backend is held to a tolerance
// (`close_enough`): that case, and its tolerances, belong to that backend's owner.
//
// Inputs travel to the backend by upload and results come back by download, so the same code
// runs on device memory.
#include <catch2/catch.hpp>

#include "core/dtype.hpp"
#include "core/rng.hpp"
#include "gpu/backend.hpp"
#include "gpu/cpu/gemm.hpp"
#include "gpu/cpu/ops.hpp"
#include "gpu/registry.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

using namespace moert;

namespace {

std::vector<float> random_floats(std::size_t n, std::uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  rng gen{seed};
  std::vector<float> out(n);
  for (auto& v : out)
    v = gen.uniform(lo, hi);
  return out;
}

// Bits of finite bf16 / f16 values.
std::vector<std::uint16_t> random_16bit(dtype type, std::size_t n, std::uint64_t seed) {
  rng gen{seed};
  std::vector<std::uint16_t> out(n);
  for (auto& v : out) {
    float f = gen.uniform(-1.0f, 1.0f);
    if (type == dtype::bf16) {
      std::uint32_t bits;
      std::memcpy(&bits, &f, 4);
      v = std::uint16_t(bits >> 16);
    } else {  // sign, exponent 10..20 of 31 (|x| in [2^-5, 2^6)), any mantissa
      auto mantissa = std::uint16_t(gen.uniform(0.0f, 1023.0f));
      auto exponent = std::uint16_t(10 + std::uint16_t(gen.uniform(0.0f, 10.0f)));
      v = std::uint16_t((f < 0 ? 0x8000 : 0) | (exponent << 10) | mantissa);
    }
  }
  return out;
}

// One backend under test with the upload/download plumbing.
struct device {
  gpu::backend_kind kind;
  std::unique_ptr<gpu::backend> b;

  gpu::buffer put(const std::vector<float>& v) const { return b->upload_floats(v); }
  gpu::buffer zeros(std::size_t n) const { return put(std::vector<float>(n, 0.0f)); }
  std::vector<float> get(const gpu::buffer& buf, std::size_t n) const {
    std::vector<float> out(n);
    b->download(out.data(), buf.data(), n * sizeof(float));
    return out;
  }
  std::vector<float> get(const float* p, std::size_t n) const {
    std::vector<float> out(n);
    b->download(out.data(), p, n * sizeof(float));
    return out;
  }
};

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// cpu: the same bits. Others: within `tolerance` relative to the element's magnitude plus
// the output's RMS: a long dot product that nearly cancels (an output near zero) still carries
// the rounding of every term (bf16 activations on tensor cores), which scales with the RMS.
void check_matches(gpu::backend_kind kind, const std::vector<float>& got, const std::vector<float>& want,
                   float tolerance = 1e-3f) {
  REQUIRE(got.size() == want.size());
  if (kind == gpu::backend_kind::cpu) {
    CHECK(same_bits(got, want));
    return;
  }
  double squares = 0;
  for (float w : want)
    squares += double(w) * double(w);
  float rms = want.empty() ? 0.0f : float(std::sqrt(squares / double(want.size())));
  std::size_t bad = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    bad += !(std::fabs(got[i] - want[i]) <= tolerance * (1.0f + rms + std::fabs(want[i])));
  CHECK(bad == 0);
}

// Calls `body` once per usable backend, each in its own section named after it. cpu runs with
// a pool of 2 threads so the parallel paths are taken.
template <class F>
void for_each_backend(F&& body) {
  for (gpu::backend_kind kind : gpu::available_backends()) {
    DYNAMIC_SECTION(gpu::to_string(kind)) {
      auto made = gpu::create_backend(kind, gpu::backend_options::with_threads(2));
      REQUIRE(made.ok());
      device dev{kind, std::move(made.value())};
      INFO("backend " << dev.b->name());
      body(dev);
    }
  }
}

}  // namespace

TEST_CASE("the registry lists cpu first and usable, and refuses what it lacks") {
  auto compiled = gpu::compiled_backends();
  REQUIRE(!compiled.empty());
  CHECK(compiled.front().kind == gpu::backend_kind::cpu);
  CHECK(compiled.front().usable);
  for (const auto& info : compiled) {
    INFO(gpu::to_string(info.kind) << ": " << info.reason);
    CHECK(info.usable == info.reason.empty());
    if (!info.usable)  // say why, visibly: the cuda cases of this binary did not run
      WARN("backend " << gpu::to_string(info.kind) << " not usable here: " << info.reason);
  }
  bool has_cuda = false;
  for (const auto& info : compiled)
    has_cuda |= info.kind == gpu::backend_kind::cuda;
  if (!has_cuda) {
    auto cuda = gpu::create_backend(gpu::backend_kind::cuda);
    REQUIRE(!cuda.ok());
    CHECK(cuda.err().message.find("cuda") != std::string::npos);
  }
  CHECK(gpu::host_backend().kind() == gpu::backend_kind::cpu);
}

TEST_CASE("memory: upload, download and copy round-trip the bytes") {
  for_each_backend([](device& d) {
    auto values = random_floats(1000, 1);
    gpu::buffer a = d.put(values);
    CHECK(a.num_bytes() == 4000);
    CHECK(a.kind() == d.kind);
    CHECK(reinterpret_cast<std::uintptr_t>(a.data()) % 64 == 0);
    gpu::buffer b = d.b->allocate(4000);
    d.b->copy(b.data(), a.data(), 4000);
    CHECK(same_bits(d.get(b, 1000), values));
    CHECK(d.b->allocate(0).empty());
    CHECK(d.b->shares_memory_with(*d.b));
  });
}

TEST_CASE("matmul is the packed GEMM's bits for f32, bf16 and f16 weights, with and without bias") {
  // 300 outputs × 512 inputs × 16 rows is past min_parallel_work: the pool splits the panels.
  const std::size_t n = 300, k = 512, rows = 16;
  for_each_backend([&](device& d) {
    auto x = random_floats(rows * k, 2);
    auto bias = random_floats(n, 3);
    gpu::buffer dx = d.put(x), dbias = d.put(bias);
    for (dtype type : {dtype::f32, dtype::bf16, dtype::f16}) {
      INFO("weights " << safetensors_name(type));
      std::vector<float> wf = random_floats(n * k, 4);
      std::vector<std::uint16_t> w16 = random_16bit(type, n * k, 5);
      const void* w = type == dtype::f32 ? static_cast<const void*>(wf.data()) : w16.data();
      const gpu::matrix_part part{w, type, n, k};
      auto m = d.b->upload_matrix(type, k, std::span{&part, 1});
      REQUIRE(m.ok());
      CHECK(m->rows() == n);
      CHECK(m->cols() == k);
      CHECK(m->type() == type);
      auto packed = cpu::packed_matrix::pack(type, w, n, k);
      std::vector<float> want(rows * n);
      cpu::matmul(x.data(), rows, packed, want.data(), nullptr);

      gpu::buffer y = d.zeros(rows * n);
      d.b->matmul(dx.floats(), rows, *m, y.floats());
      check_matches(d.kind, d.get(y, rows * n), want, type == dtype::f32 ? 1e-3f : 2e-2f);

      std::vector<float> with_bias = want;
      for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t i = 0; i < n; ++i)
          with_bias[r * n + i] += bias[i];
      d.b->matmul(dx.floats(), rows, *m, y.floats(), dbias.floats());
      auto batched = d.get(y, rows * n);
      check_matches(d.kind, batched, with_bias, type == dtype::f32 ? 1e-3f : 2e-2f);

      // Batch invariance: row 5 alone gives the bits it got among 16.
      if (d.kind == gpu::backend_kind::cpu) {
        gpu::buffer one = d.zeros(n);
        d.b->matmul(dx.floats() + 5 * k, 1, *m, one.floats(), dbias.floats());
        CHECK(same_bits(d.get(one, n), std::vector<float>(batched.begin() + 5 * n, batched.begin() + 6 * n)));
      }
    }
  });
}

TEST_CASE("matmul_batch: a device's expert GEMMs (rows 0 to many) are each the packed GEMM's") {
  // Row counts from none to past a grouped/dense switch at a few rows: on cuda both paths run.
  const std::size_t n = 96, k = 128;
  const std::size_t rows[] = {0, 1, 3, 17, 64, 2};
  for_each_backend([&](device& d) {
    for (dtype type : {dtype::f32, dtype::bf16}) {
      INFO("weights " << safetensors_name(type));
      std::vector<gpu::matrix> weights;
      std::vector<gpu::buffer> xs, ys;
      std::vector<std::vector<float>> want;
      std::vector<gpu::batched_matmul> batch;
      for (std::size_t e = 0; e < std::size(rows); ++e) {
        std::vector<float> wf = random_floats(n * k, 40 + e);
        std::vector<std::uint16_t> w16 = random_16bit(type, n * k, 50 + e);
        const void* w = type == dtype::f32 ? static_cast<const void*>(wf.data()) : w16.data();
        const gpu::matrix_part part{w, type, n, k};
        auto m = d.b->upload_matrix(type, k, std::span{&part, 1});
        REQUIRE(m.ok());
        weights.push_back(std::move(*m));
        auto x = random_floats(std::max<std::size_t>(1, rows[e]) * k, 60 + e);
        std::vector<float> expect(rows[e] * n);
        cpu::matmul(x.data(), rows[e], cpu::packed_matrix::pack(type, w, n, k), expect.data(), nullptr);
        want.push_back(std::move(expect));
        xs.push_back(d.put(x));
        ys.push_back(d.zeros(std::max<std::size_t>(1, rows[e]) * n));
      }
      for (std::size_t e = 0; e < std::size(rows); ++e)
        batch.push_back({&weights[e], xs[e].floats(), ys[e].floats(), rows[e]});
      d.b->matmul_batch(batch);
      for (std::size_t e = 0; e < std::size(rows); ++e) {
        INFO("expert " << e << ", " << rows[e] << " rows");
        check_matches(d.kind, d.get(ys[e], rows[e] * n), want[e], type == dtype::f32 ? 1e-3f : 2e-2f);
      }
    }
  });
}

TEST_CASE("upload_matrix joins parts, reads transposed parts, and refuses a narrowing") {
  const std::size_t k = 24;
  for_each_backend([&](device& d) {
    auto a = random_16bit(dtype::bf16, 20 * k, 6), b = random_16bit(dtype::bf16, 12 * k, 7);
    const gpu::matrix_part parts[] = {{a.data(), dtype::bf16, 20, k}, {b.data(), dtype::bf16, 12, k}};
    auto joined = d.b->upload_matrix(dtype::bf16, k, parts);
    auto widened = d.b->upload_matrix(dtype::f32, k, parts);
    REQUIRE(joined.ok());
    REQUIRE(widened.ok());
    CHECK(joined->rows() == 32);
    CHECK(widened->type() == dtype::f32);
    auto x = random_floats(3 * k, 8);
    gpu::buffer dx = d.put(x), y1 = d.zeros(3 * 32), y2 = d.zeros(3 * 32);
    d.b->matmul(dx.floats(), 3, *joined, y1.floats());
    d.b->matmul(dx.floats(), 3, *widened, y2.floats());
    // Widening is exact on cpu (the same bits); a GPU's bf16 GEMM rounds activations too.
    check_matches(d.kind, d.get(y1, 96), d.get(y2, 96), 2e-2f);

    // A transposed part (row_stride 1, col_stride = rows): W[r][c] = stored[c][r].
    auto stored = random_floats(k * 10, 9);  // 10 rows of k, read as W[k][10] = storedᵀ
    const gpu::matrix_part t{stored.data(), dtype::f32, k, 1, k};
    auto tm = d.b->upload_matrix(dtype::f32, 10, std::span{&t, 1});
    REQUIRE(tm.ok());
    std::vector<float> dense(k * 10);
    for (std::size_t r = 0; r < k; ++r)
      for (std::size_t c = 0; c < 10; ++c)
        dense[r * 10 + c] = stored[c * k + r];
    auto x2 = random_floats(2 * 10, 10);
    std::vector<float> want(2 * k);
    cpu::matmul(x2.data(), 2, cpu::packed_matrix::pack(dense.data(), k, 10), want.data(), nullptr);
    gpu::buffer dx2 = d.put(x2), y3 = d.zeros(2 * k);
    d.b->matmul(dx2.floats(), 2, *tm, y3.floats());
    check_matches(d.kind, d.get(y3, 2 * k), want);

    auto narrowed = d.b->upload_matrix(dtype::bf16, k, std::span{&t, 1});
    REQUIRE(!narrowed.ok());
    CHECK(narrowed.err().message.find("F32") != std::string::npos);
  });
}

TEST_CASE("rms_norm: rows, strided rows in place, and the per-head form") {
  for_each_backend([](device& d) {
    const std::size_t rows = 7, dim = 40, stride = 48;
    auto x = random_floats(rows * stride, 11), w = random_floats(dim, 12, 0.8f, 1.2f);
    gpu::buffer dx = d.put(x), dw = d.put(w), out = d.zeros(rows * stride);
    std::vector<float> want(rows * stride, 0.0f);
    for (std::size_t r = 0; r < rows; ++r)
      cpu::rms_norm(x.data() + r * stride, w.data(), dim, 1e-6f, want.data() + r * stride);
    d.b->rms_norm(dx.floats(), rows, dim, stride, dw.floats(), 1e-6f, out.floats());
    check_matches(d.kind, d.get(out, rows * stride), want);

    // In place, only the first `dim` of each row (MLA's kv latent): the rest stays.
    std::vector<float> in_place = x;
    for (std::size_t r = 0; r < rows; ++r)
      cpu::rms_norm(in_place.data() + r * stride, w.data(), dim, 1e-6f, in_place.data() + r * stride);
    d.b->rms_norm(dx.floats(), rows, dim, stride, dw.floats(), 1e-6f, dx.floats());
    check_matches(d.kind, d.get(dx, rows * stride), in_place);

    // Per head: 5 tokens × 4 heads of 16.
    auto q = random_floats(5 * 64, 13), hw = random_floats(16, 14, 0.8f, 1.2f);
    std::vector<float> q_want = q;
    for (std::size_t h = 0; h < 20; ++h)
      cpu::rms_norm(q_want.data() + h * 16, hw.data(), 16, 1e-6f, q_want.data() + h * 16);
    gpu::buffer dq = d.put(q), dhw = d.put(hw);
    d.b->rms_norm(dq.floats(), 20, 16, 16, dhw.floats(), 1e-6f, dq.floats());
    check_matches(d.kind, d.get(dq, 5 * 64), q_want);
  });
}

TEST_CASE("rope: rotate-half over heads and interleaved at an offset, per row positions") {
  for_each_backend([](device& d) {
    const std::size_t rows = 4, dim = 16;
    auto table = random_floats(50 * dim, 15);  // positions 0..49: dim/2 cos then dim/2 sin
    std::vector<std::size_t> positions{0, 7, 49, 7};
    // rotate-half: rows of 3 heads × 16.
    auto x = random_floats(rows * 48, 16);
    std::vector<float> want = x;
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t h = 0; h < 3; ++h) {
        const float* cs = table.data() + positions[r] * dim;
        cpu::rope_rotate_half(want.data() + r * 48 + h * 16, dim, cs, cs + dim / 2);
      }
    gpu::buffer dx = d.put(x);
    d.b->rope(dx.floats(), rows, 48, 3, 16, dim, gpu::rope_style::rotate_half, table.data(), positions.data());
    check_matches(d.kind, d.get(dx, rows * 48), want);

    // interleaved: the last 16 of rows of 40 (MLA's k_pe at offset 24), one "head".
    auto y = random_floats(rows * 40, 17);
    std::vector<float> y_want = y;
    for (std::size_t r = 0; r < rows; ++r) {
      const float* cs = table.data() + positions[r] * dim;
      cpu::rope_interleaved(y_want.data() + r * 40 + 24, dim, cs, cs + dim / 2);
    }
    gpu::buffer dy = d.put(y);
    d.b->rope(dy.floats() + 24, rows, 40, 1, 0, dim, gpu::rope_style::interleaved, table.data(), positions.data());
    check_matches(d.kind, d.get(dy, rows * 40), y_want);
  });
}

TEST_CASE("attention (GQA) and MLA shared-row attention over per-row caches") {
  for_each_backend([](device& d) {
    // Two sequences' caches; three query rows: positions 0 and 5 of the first, 300 of the second.
    const std::size_t heads = 4, kv_heads = 2, head_dim = 8, kv_dim = kv_heads * head_dim;
    const std::size_t len_a = 6, len_b = 301;
    auto ka = random_floats(len_a * kv_dim, 18), va = random_floats(len_a * kv_dim, 19);
    auto kb = random_floats(len_b * kv_dim, 20), vb = random_floats(len_b * kv_dim, 21);
    gpu::buffer dka = d.put(ka), dva = d.put(va), dkb = d.put(kb), dvb = d.put(vb);
    auto q = random_floats(3 * heads * head_dim, 22);
    gpu::buffer dq = d.put(q), out = d.zeros(3 * heads * head_dim);
    std::vector<gpu::kv_rows> rows{{dka.floats(), dva.floats(), 1},
                                   {dka.floats(), dva.floats(), len_a},
                                   {dkb.floats(), dvb.floats(), len_b}};
    const float scale = 0.35f;
    d.b->attention(dq.floats(), rows, {heads, kv_heads, head_dim, kv_dim, scale}, out.floats());
    std::vector<float> want(3 * heads * head_dim);
    const float* host_k[] = {ka.data(), ka.data(), kb.data()};
    const float* host_v[] = {va.data(), va.data(), vb.data()};
    for (std::size_t t = 0; t < 3; ++t) {
      std::vector<float> scores(rows[t].num_positions);
      cpu::attend(q.data() + t * heads * head_dim, host_k[t], host_v[t], kv_dim, rows[t].num_positions, heads,
                  kv_heads, head_dim, scale, scores.data(), want.data() + t * heads * head_dim);
    }
    auto batched = d.get(out, want.size());
    check_matches(d.kind, batched, want);
    if (d.kind == gpu::backend_kind::cpu) {  // the last row alone
      gpu::buffer one = d.zeros(heads * head_dim);
      d.b->attention(dq.floats() + 2 * heads * head_dim, std::span{rows}.subspan(2), {heads, kv_heads, head_dim, kv_dim, scale},
                     one.floats());
      CHECK(same_bits(d.get(one, heads * head_dim),
                      std::vector<float>(batched.begin() + 2 * heads * head_dim, batched.end())));
    }

    // MLA: rows of 24 (latent 16 + rope 8), 3 heads, key_dim 24, value_dim 16.
    const std::size_t row = 24, rank = 16;
    auto cache = random_floats(len_b * row, 23);
    gpu::buffer dc = d.put(cache);
    auto mq = random_floats(2 * 3 * row, 24);
    gpu::buffer dmq = d.put(mq), mout = d.zeros(2 * 3 * rank);
    std::vector<gpu::kv_rows> mrows{{dc.floats(), nullptr, 3}, {dc.floats(), nullptr, len_b}};
    d.b->mla_attention(dmq.floats(), mrows, {3, row, rank, row, scale}, mout.floats());
    std::vector<float> mwant(2 * 3 * rank);
    for (std::size_t t = 0; t < 2; ++t) {
      std::vector<float> scores(mrows[t].num_positions);
      cpu::attend_shared_row(mq.data() + t * 3 * row, cache.data(), row, mrows[t].num_positions, 3, row, rank, scale,
                             scores.data(), mwant.data() + t * 3 * rank);
    }
    check_matches(d.kind, d.get(mout, mwant.size()), mwant);
  });
}

namespace {

// The router's definition, written out from the kernels (softmax) and the documented rule.
std::vector<gpu::routed_slot> route_reference(std::vector<float> logits, std::size_t rows, const gpu::route_params& p) {
  std::vector<gpu::routed_slot> out;
  std::size_t group_size = p.num_experts / p.num_groups;
  for (std::size_t t = 0; t < rows; ++t) {
    float* probs = logits.data() + t * p.num_experts;
    cpu::softmax(probs, p.num_experts);
    std::vector<float> eligible(probs, probs + p.num_experts);
    if (p.num_groups > 1) {
      std::vector<std::size_t> groups(p.num_groups);
      std::iota(groups.begin(), groups.end(), 0);
      auto gmax = [&](std::size_t g) { return *std::max_element(probs + g * group_size, probs + (g + 1) * group_size); };
      std::stable_sort(groups.begin(), groups.end(), [&](std::size_t a, std::size_t b) { return gmax(a) > gmax(b); });
      for (std::size_t i = p.topk_group; i < p.num_groups; ++i)
        std::fill_n(eligible.begin() + std::ptrdiff_t(groups[i] * group_size), group_size, 0.0f);
    }
    std::vector<std::int32_t> order(p.num_experts);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) { return eligible[a] > eligible[b]; });
    std::vector<gpu::routed_slot> r;
    float sum = 0.0f;
    for (std::size_t s = 0; s < p.top_k; ++s) {
      r.push_back({order[s], probs[order[s]]});
      sum += r.back().weight;
    }
    for (auto& slot : r)
      slot.weight = (p.renormalize ? slot.weight / sum : slot.weight) * p.scaling;
    std::sort(r.begin(), r.end(), [](const auto& a, const auto& b) { return a.expert < b.expert; });
    out.insert(out.end(), r.begin(), r.end());
  }
  return out;
}

}  // namespace

TEST_CASE("route: softmax top-k, renormalised or scaled, group-limited greedy") {
  for_each_backend([](device& d) {
    const std::size_t rows = 40;
    gpu::route_params plain{.num_experts = 8, .top_k = 2, .renormalize = true};
    gpu::route_params grouped{.num_experts = 8, .top_k = 3, .num_groups = 4, .topk_group = 2, .scaling = 2.5f};
    for (const gpu::route_params& p : {plain, grouped}) {
      INFO("groups " << p.num_groups);
      auto logits = random_floats(rows * p.num_experts, 25, -3.0f, 3.0f);
      gpu::buffer dl = d.put(logits);
      std::vector<gpu::routed_slot> routes(rows * p.top_k);
      d.b->route(dl.floats(), rows, p, routes.data());
      auto want = route_reference(logits, rows, p);
      for (std::size_t i = 0; i < routes.size(); ++i) {
        CHECK(routes[i].expert == want[i].expert);
        if (d.kind == gpu::backend_kind::cpu)
          CHECK(std::memcmp(&routes[i].weight, &want[i].weight, sizeof(float)) == 0);
        else
          CHECK(routes[i].weight == Approx(want[i].weight).epsilon(1e-3));
      }
      // A row alone: same slots, same bits.
      gpu::buffer one = d.put(std::vector<float>(logits.begin() + 9 * std::ptrdiff_t(p.num_experts),
                                                 logits.begin() + 10 * std::ptrdiff_t(p.num_experts)));
      std::vector<gpu::routed_slot> alone(p.top_k);
      d.b->route(one.floats(), 1, p, alone.data());
      for (std::size_t s = 0; s < p.top_k; ++s) {
        CHECK(alone[s].expert == routes[9 * p.top_k + s].expert);
        CHECK(std::memcmp(&alone[s].weight, &routes[9 * p.top_k + s].weight, sizeof(float)) == 0);
      }
    }
  });
}

TEST_CASE("swiglu, sigmoid_gate and add are the row-wise kernels") {
  for_each_backend([](device& d) {
    const std::size_t rows = 6, dim = 33;
    auto gate_up = random_floats(rows * 2 * dim, 26, -4.0f, 4.0f);
    std::vector<float> want(rows * dim);
    for (std::size_t r = 0; r < rows; ++r)
      cpu::silu_mul(gate_up.data() + r * 2 * dim, gate_up.data() + r * 2 * dim + dim, dim, want.data() + r * dim);
    gpu::buffer dgu = d.put(gate_up), out = d.zeros(rows * dim);
    d.b->swiglu(dgu.floats(), rows, dim, out.floats());
    check_matches(d.kind, d.get(out, rows * dim), want);

    auto gate = random_floats(rows, 27, -3.0f, 3.0f);
    std::vector<float> gated = want;
    for (std::size_t r = 0; r < rows; ++r) {
      float g = 1.0f / (1.0f + std::exp(-gate[r]));
      for (std::size_t i = 0; i < dim; ++i)
        gated[r * dim + i] = g * gated[r * dim + i];
    }
    gpu::buffer dg = d.put(gate);
    d.b->sigmoid_gate(dg.floats(), rows, dim, out.floats());
    check_matches(d.kind, d.get(out, rows * dim), gated);

    auto y = random_floats(rows * dim, 28);
    std::vector<float> sum = gated;
    for (std::size_t i = 0; i < sum.size(); ++i)
      sum[i] += y[i];
    gpu::buffer dy = d.put(y);
    d.b->add(out.floats(), dy.floats(), rows * dim);
    check_matches(d.kind, d.get(out, rows * dim), sum);
  });
}

TEST_CASE("gather, scatter and strided copies move rows exactly") {
  for_each_backend([](device& d) {
    const std::size_t dim = 12;
    auto table = random_floats(10 * dim, 29);
    gpu::buffer dt = d.put(table);
    std::vector<std::size_t> picks{3, 0, 9, 3};
    std::vector<const float*> src;
    for (std::size_t i : picks)
      src.push_back(dt.floats() + i * dim);
    gpu::buffer g = d.zeros(picks.size() * dim);
    d.b->gather_rows(src.data(), src.size(), dim, g.floats());
    std::vector<float> want;
    for (std::size_t i : picks)
      want.insert(want.end(), table.begin() + std::ptrdiff_t(i * dim), table.begin() + std::ptrdiff_t((i + 1) * dim));
    CHECK(same_bits(d.get(g, want.size()), want));

    // Scatter rows 0..2 of a 16-wide block (first 12 floats) to cache positions 5, 1, 7.
    auto block = random_floats(3 * 16, 30);
    gpu::buffer db = d.put(block), cache = d.zeros(8 * dim);
    std::vector<float*> dst{cache.floats() + 5 * dim, cache.floats() + 1 * dim, cache.floats() + 7 * dim};
    d.b->scatter_rows(db.floats(), 16, 3, dim, dst.data());
    std::vector<float> cache_want(8 * dim, 0.0f);
    std::size_t at[] = {5, 1, 7};
    for (std::size_t r = 0; r < 3; ++r)
      std::copy_n(block.data() + r * 16, dim, cache_want.data() + at[r] * dim);
    CHECK(same_bits(d.get(cache, 8 * dim), cache_want));

    // copy_rows: columns 4..9 of each 16-wide row into a 6-wide block.
    gpu::buffer narrow = d.zeros(3 * 6);
    d.b->copy_rows(db.floats() + 4, 16, narrow.floats(), 6, 3, 6);
    std::vector<float> narrow_want;
    for (std::size_t r = 0; r < 3; ++r)
      narrow_want.insert(narrow_want.end(), block.begin() + std::ptrdiff_t(r * 16 + 4),
                         block.begin() + std::ptrdiff_t(r * 16 + 10));
    CHECK(same_bits(d.get(narrow, 18), narrow_want));
  });
}

TEST_CASE("weight_rows and combine: the weighted sum in slot order") {
  for_each_backend([](device& d) {
    const std::size_t rows = 5, top_k = 3, dim = 20;
    auto outputs = random_floats(rows * top_k * dim, 31);  // one expert output per (row, slot)
    auto weights = random_floats(rows * top_k, 32, 0.0f, 1.0f);
    auto side = random_floats(rows * dim, 33);
    auto x = random_floats(rows * dim, 34);
    gpu::buffer dout = d.put(outputs), weighted = d.zeros(rows * top_k * dim), dside = d.put(side), dx = d.put(x);
    // Scale slot i's output into the slot's place, scattered in reverse order.
    std::vector<float*> dst(rows * top_k);
    for (std::size_t i = 0; i < dst.size(); ++i)
      dst[i] = weighted.floats() + (dst.size() - 1 - i) * dim;
    d.b->weight_rows(dout.floats(), rows * top_k, dim, weights.data(), dst.data());
    std::vector<float> weighted_want(rows * top_k * dim);
    for (std::size_t i = 0; i < rows * top_k; ++i)
      for (std::size_t j = 0; j < dim; ++j)
        weighted_want[(rows * top_k - 1 - i) * dim + j] = outputs[i * dim + j] * weights[i];
    CHECK(same_bits(d.get(weighted, weighted_want.size()), weighted_want));

    std::vector<const float*> slots(rows * top_k);
    for (std::size_t i = 0; i < slots.size(); ++i)
      slots[i] = weighted.floats() + i * dim;
    std::vector<float> want = x;  // x[r] += (Σ_s weighted[r, s]) + side[r], the sum from +0
    for (std::size_t t = 0; t < rows; ++t) {
      std::vector<float> acc(dim, 0.0f);
      for (std::size_t s = 0; s < top_k; ++s)
        for (std::size_t j = 0; j < dim; ++j)
          acc[j] += weighted_want[(t * top_k + s) * dim + j];
      for (std::size_t j = 0; j < dim; ++j)
        acc[j] += side[t * dim + j];
      for (std::size_t j = 0; j < dim; ++j)
        want[t * dim + j] += acc[j];
    }
    d.b->combine(slots.data(), top_k, dside.floats(), rows, dim, dx.floats());
    check_matches(d.kind, d.get(dx, rows * dim), want);
  });
}

TEST_CASE("concurrent lanes run every range once, and a lane's matmul has the backend's bits") {
  for_each_backend([](device& d) {
    const std::size_t n = 64, k = 128, tasks = 9;
    auto w = random_floats(n * k, 35);
    const gpu::matrix_part part{w.data(), dtype::f32, n, k};
    auto m = d.b->upload_matrix(dtype::f32, k, std::span{&part, 1});
    REQUIRE(m.ok());
    auto x = random_floats(tasks * k, 36);
    gpu::buffer dx = d.put(x), lanes_out = d.zeros(tasks * n), whole = d.zeros(tasks * n);
    std::vector<std::atomic<int>> seen(tasks);
    d.b->concurrent(tasks, std::size_t(1) << 30, [&](gpu::backend& lane, std::size_t begin, std::size_t end) {
      for (std::size_t i = begin; i < end; ++i) {
        ++seen[i];
        lane.matmul(dx.floats() + i * k, 1, *m, lanes_out.floats() + i * n);
      }
    });
    d.b->synchronize();
    for (std::size_t i = 0; i < tasks; ++i)
      CHECK(seen[i].load() == 1);
    d.b->matmul(dx.floats(), tasks, *m, whole.floats());
    check_matches(d.kind, d.get(lanes_out, tasks * n), d.get(whole, tasks * n));
  });
}

TEST_CASE("when_done calls back once the work issued before it is done") {
  for_each_backend([](device& d) {
    auto x = random_floats(256, 37);
    gpu::buffer a = d.put(x), b = d.zeros(256);
    d.b->copy(b.data(), a.data(), 256 * sizeof(float));
    std::atomic<bool> called{false};
    d.b->when_done([&] { called = true; });
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!called && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    REQUIRE(called);
    CHECK(same_bits(d.get(b, 256), x));
  });
}

TEST_CASE("the cpu backend's bits do not depend on its thread count") {
  auto one = gpu::create_backend(gpu::backend_kind::cpu, gpu::backend_options::with_threads(1));
  auto four = gpu::create_backend(gpu::backend_kind::cpu, gpu::backend_options::with_threads(4));
  REQUIRE(one.ok());
  REQUIRE(four.ok());
  const std::size_t n = 256, k = 512, rows = 20;
  auto w = random_16bit(dtype::bf16, n * k, 38);
  const gpu::matrix_part part{w.data(), dtype::bf16, n, k};
  auto m = gpu::host_backend().upload_matrix(dtype::bf16, k, std::span{&part, 1});  // shared by both
  REQUIRE(m.ok());
  auto x = random_floats(rows * k, 39);
  std::vector<float> y1(rows * n), y4(rows * n);
  (*one)->matmul(x.data(), rows, *m, y1.data());
  (*four)->matmul(x.data(), rows, *m, y4.data());
  CHECK(same_bits(y1, y4));
}
