// Every operation of the CUDA backend against the cpu backend (the reference) on the same
// inputs: f32 within 1e-3 relative, 16-bit weights within 2e-2, routing choices and row moves
// exact; the grouped/dense expert GEMM switch; greedy tokens of the ../shared/fixtures models
// through the CUDA backend identical to the expected ones.
//
// Without a GPU (CI) the device cases cannot run: the binary says
// "SKIPPED: no CUDA device: <the CUDA runtime's reason>" and exits 77, which ctest reports as
// Not Run. The cases that need no device (no-GPU errors, the switch's fit) run everywhere.
#include <catch2/catch.hpp>

#include "gpu/cpu/backend.hpp"
#include "gpu/cuda/backend.hpp"
#include "gpu/cuda/gemm.hpp"
#include "gpu/registry.hpp"
#include "model/forward.hpp"
#include "model/safetensors.hpp"
#include "test_support.hpp"

#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>

#include <unistd.h>

using namespace moert;

namespace {

struct gpu_state {
  std::unique_ptr<cuda::cuda_backend> cuda;
  std::string why_none;
};

gpu_state& gpu_once() {
  static gpu_state state = [] {
    gpu_state s;
    auto b = cuda::cuda_backend::create(0);
    if (b)
      s.cuda = std::move(*b);
    else
      s.why_none = b.err().message;
    return s;
  }();
  return state;
}

// Ends the case (and marks the binary skipped) when there is no GPU.
#define REQUIRE_GPU()                                     \
  if (!gpu_once().cuda) {                                 \
    test::skip_whole_binary(gpu_once().why_none);         \
    return;                                               \
  }                                                       \
  cuda::cuda_backend& dev = *gpu_once().cuda;             \
  cpu::cpu_backend ref{std::size_t{1}}

std::vector<float> random_floats(std::size_t n, std::uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 gen{seed};
  std::uniform_real_distribution<float> dist{lo, hi};
  std::vector<float> v(n);
  for (float& x : v)
    x = dist(gen);
  return v;
}

// A device copy of host floats, and the way back.
gpu::buffer to_dev(cuda::cuda_backend& dev, const std::vector<float>& v) {
  return dev.upload_floats(v);
}
std::vector<float> to_host(cuda::cuda_backend& dev, const gpu::buffer& b, std::size_t n) {
  std::vector<float> out(n);
  dev.download(out.data(), b.data(), n * sizeof(float));
  REQUIRE(dev.error().ok());
  return out;
}

// |a - b| <= tol · max(1, |b|, rms(b)) everywhere ("relative-ish": outputs near zero are
// judged against the typical magnitude); reports the worst element.
void check_close(const std::vector<float>& got, const std::vector<float>& want, float tol, const char* what) {
  REQUIRE(got.size() == want.size());
  double sum_sq = 0.0;
  for (float v : want)
    sum_sq += double(v) * double(v);
  double rms = want.empty() ? 0.0 : std::sqrt(sum_sq / double(want.size()));
  double worst = 0.0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    double err = std::fabs(double(got[i]) - double(want[i])) / std::max({1.0, std::fabs(double(want[i])), rms});
    if (!(err <= worst)) {
      worst = err;
      at = i;
    }
  }
  INFO(what << ": worst relative error " << worst << " at " << at << " (got " << got[at] << ", want " << want[at]
            << ")");
  CHECK(worst <= tol);
}

std::uint16_t to_bf16(float f) {  // round to nearest even, as the checkpoint writers do
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return std::uint16_t(bits >> 16);
}

constexpr float f32_tol = 1e-3f;
constexpr float bf16_tol = 2e-2f;

namespace fs = std::filesystem;

struct temp_dir {
  fs::path path;
  temp_dir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("moert_cuda_" + std::to_string(rd()) + "_" + std::to_string(::getpid()));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
};

// The fixture in `src` with every tensor rounded to bf16 (as torch's .to(bfloat16)), written
// to `dir` as one model.safetensors beside its config.json.
void write_bf16_fixture(const fs::path& src, const fs::path& dir) {
  auto ck = model::checkpoint::open(src);
  REQUIRE(ck.ok());
  nlohmann::json header = nlohmann::json::object();
  std::vector<char> data;
  for (const auto& [name, view] : ck->tensors()) {
    auto values = ck->read_f32(name, view.shape);
    REQUIRE(values.ok());
    std::size_t begin = data.size();
    for (float v : *values) {
      std::uint16_t bits = to_bf16(v);
      data.push_back(char(bits & 0xff));
      data.push_back(char(bits >> 8));
    }
    header[name] = {{"dtype", "BF16"}, {"shape", view.shape}, {"data_offsets", {begin, data.size()}}};
  }
  fs::copy_file(src / "config.json", dir / "config.json");
  std::string text = header.dump();
  std::uint64_t len = text.size();
  std::ofstream out(dir / "model.safetensors", std::ios::binary | std::ios::trunc);
  for (int i = 0; i < 8; ++i)
    out.put(char(len >> (8 * i)));
  out.write(text.data(), std::streamsize(text.size()));
  out.write(data.data(), std::streamsize(data.size()));
  REQUIRE(out.good());
}

}  // namespace

// -- cases that need no GPU --------------------------------------------------------------------

TEST_CASE("cuda: no GPU is a clear error, never a crash", "[cuda]") {
  auto count = cuda::device_count();
  std::string why;
  std::size_t n = cuda::device_count(why);
  if (!count) {
    INFO(count.err().message);
    CHECK(count.err().code == error_code::device_error);
    CHECK(count.err().message.rfind("no CUDA device: cudaGetDeviceCount", 0) == 0);
    CHECK(n == 0);
    CHECK(why == count.err().message);
    auto b = gpu::create_backend(gpu::backend_kind::cuda);
    REQUIRE_FALSE(b.ok());
    CHECK(b.err().message.find("no CUDA device") != std::string::npos);
    bool listed = false;
    for (const gpu::backend_info& info : gpu::compiled_backends())
      if (info.kind == gpu::backend_kind::cuda) {
        listed = true;
        CHECK_FALSE(info.usable);
        CHECK(info.reason == count.err().message);
      }
    CHECK(listed);
  } else {
    CHECK(n == std::size_t(*count));
    auto b = cuda::cuda_backend::create(*count);  // one past the last
    REQUIRE_FALSE(b.ok());
    CHECK(b.err().message.find("does not exist") != std::string::npos);
  }
}

TEST_CASE("cuda: the grouped/dense switch comes from the sweep, the default says it is uncalibrated", "[cuda]") {
  auto def = cuda::gemm_switch::uncalibrated_default();
  CHECK_FALSE(def.calibrated);
  CHECK(def.source.find("uncalibrated") != std::string::npos);

  std::vector<cuda::gemm_timing> sweep{{16, 1.0, 3.0}, {256, 2.0, 2.5}, {1024, 4.0, 3.9}, {2048, 8.0, 8.5},
                                       {4096, 16.0, 12.0}, {8192, 32.0, 20.0}};
  auto sw = cuda::fit_gemm_switch(sweep, "test sweep");
  REQUIRE(sw.ok());
  CHECK(sw->calibrated);
  CHECK(sw->source == "test sweep");
  // 1024 was a lucky point: dense loses again at 2048, so the switch starts at 4096.
  CHECK(sw->dense_min_rows == 4096);
  CHECK(sw->choose(4095) == cuda::gemm_kind::grouped);
  CHECK(sw->choose(4096) == cuda::gemm_kind::dense);

  std::vector<cuda::gemm_timing> never{{16, 1.0, 2.0}, {4096, 5.0, 6.0}};
  CHECK(cuda::fit_gemm_switch(never, "x")->choose(1u << 30) == cuda::gemm_kind::grouped);
  std::vector<cuda::gemm_timing> always{{16, 2.0, 1.0}, {4096, 6.0, 5.0}};
  CHECK(cuda::fit_gemm_switch(always, "x")->dense_min_rows == 16);
  CHECK_FALSE(cuda::fit_gemm_switch({}, "x").ok());
  std::vector<cuda::gemm_timing> unsorted{{64, 1.0, 1.0}, {16, 1.0, 1.0}};
  CHECK_FALSE(cuda::fit_gemm_switch(unsorted, "x").ok());
}

// -- operations against the cpu backend --------------------------------------------------------

TEST_CASE("cuda: matmul f32 (+bias) and 16-bit weights against the cpu backend", "[cuda][gpu]") {
  REQUIRE_GPU();
  for (auto [m, n, k] : {std::array<std::size_t, 3>{1, 64, 96}, {7, 130, 33}, {64, 256, 512}, {300, 48, 80}}) {
    auto w = random_floats(n * k, 1);
    auto x = random_floats(m * k, 2);
    auto bias = random_floats(n, 3);
    gpu::matrix_part part{w.data(), dtype::f32, n, k};
    auto wr = ref.upload_matrix(dtype::f32, k, {&part, 1});
    auto wd = dev.upload_matrix(dtype::f32, k, {&part, 1});
    REQUIRE(wr.ok());
    REQUIRE(wd.ok());
    std::vector<float> want(m * n);
    ref.matmul(x.data(), m, *wr, want.data(), bias.data());
    auto xd = to_dev(dev, x), bd = to_dev(dev, bias);
    auto yd = dev.allocate(m * n * sizeof(float));
    dev.matmul(xd.floats(), m, *wd, yd.floats(), bd.floats());
    check_close(to_host(dev, yd, m * n), want, f32_tol, "f32 matmul");

    // bf16 weights: the cpu backend widens exactly, cuda rounds the activations to bf16 too.
    std::vector<std::uint16_t> w16(n * k);
    for (std::size_t i = 0; i < w.size(); ++i)
      w16[i] = to_bf16(w[i]);
    gpu::matrix_part part16{w16.data(), dtype::bf16, n, k};
    auto wr16 = ref.upload_matrix(dtype::bf16, k, {&part16, 1});
    auto wd16 = dev.upload_matrix(dtype::bf16, k, {&part16, 1});
    REQUIRE(wr16.ok());
    REQUIRE(wd16.ok());
    ref.matmul(x.data(), m, *wr16, want.data(), nullptr);
    dev.matmul(xd.floats(), m, *wd16, yd.floats(), nullptr);
    check_close(to_host(dev, yd, m * n), want, bf16_tol, "bf16 matmul");
  }
}

TEST_CASE("cuda: upload_matrix reads parts, strides and widens like the cpu backend", "[cuda][gpu]") {
  REQUIRE_GPU();
  std::size_t n1 = 5, n2 = 11, k = 24;
  auto a = random_floats(n1 * k, 4);
  auto bt = random_floats(k * n2, 5);  // stored transposed: element (r, c) at c·n2 + r
  std::vector<std::uint16_t> a16(a.size());
  for (std::size_t i = 0; i < a.size(); ++i)
    a16[i] = to_bf16(a[i]);
  std::vector<gpu::matrix_part> parts{{a16.data(), dtype::bf16, n1, k}, {bt.data(), dtype::f32, n2, 1, n2}};
  auto wr = ref.upload_matrix(dtype::f32, k, parts);
  auto wd = dev.upload_matrix(dtype::f32, k, parts);
  REQUIRE(wr.ok());
  REQUIRE(wd.ok());
  CHECK(wd->rows() == n1 + n2);
  auto x = random_floats(3 * k, 6);
  std::vector<float> want(3 * (n1 + n2));
  ref.matmul(x.data(), 3, *wr, want.data(), nullptr);
  auto xd = to_dev(dev, x);
  auto yd = dev.allocate(want.size() * sizeof(float));
  dev.matmul(xd.floats(), 3, *wd, yd.floats(), nullptr);
  check_close(to_host(dev, yd, want.size()), want, f32_tol, "parts");
  CHECK_FALSE(dev.upload_matrix(dtype::bf16, k, {&parts[1], 1}).ok());  // f32 → bf16 would round
}

TEST_CASE("cuda: rms_norm (rows, per head, strided) and rope (both styles)", "[cuda][gpu]") {
  REQUIRE_GPU();
  std::size_t rows = 9, dim = 200, stride = 232;
  auto x = random_floats(rows * stride, 7);
  auto w = random_floats(dim, 8, 0.5f, 1.5f);
  auto xd = to_dev(dev, x), wd = to_dev(dev, w);
  std::vector<float> want = x;
  ref.rms_norm(want.data(), rows, dim, stride, w.data(), 1e-6f, want.data());
  dev.rms_norm(xd.floats(), rows, dim, stride, wd.floats(), 1e-6f, xd.floats());
  check_close(to_host(dev, xd, x.size()), want, f32_tol, "rms_norm strided in place");

  std::size_t heads = 4, head_dim = 24;  // qwen3's per-head q_norm
  auto q = random_floats(rows * heads * head_dim, 9);
  auto hw = random_floats(head_dim, 10, 0.5f, 1.5f);
  auto qd = to_dev(dev, q), hwd = to_dev(dev, hw);
  std::vector<float> qwant(q.size());
  ref.rms_norm(q.data(), rows * heads, head_dim, head_dim, hw.data(), 1e-6f, qwant.data());
  auto qout = dev.allocate(q.size() * sizeof(float));
  dev.rms_norm(qd.floats(), rows * heads, head_dim, head_dim, hwd.floats(), 1e-6f, qout.floats());
  check_close(to_host(dev, qout, q.size()), qwant, f32_tol, "per-head rms_norm");

  std::size_t rope_dim = 16, max_pos = 40, row_stride = heads * head_dim + 8;
  auto table = random_floats(max_pos * rope_dim, 11);  // any angles: the op just applies them
  std::vector<std::size_t> positions{0, 3, 39, 7, 7, 1, 20, 38, 2};
  for (gpu::rope_style style : {gpu::rope_style::rotate_half, gpu::rope_style::interleaved}) {
    auto y = random_floats(rows * row_stride, 12);
    auto yd = to_dev(dev, y);
    // Rotate the last rope_dim floats of each head (MLA's q_pe sits after q_nope).
    ref.rope(y.data() + head_dim - rope_dim, rows, row_stride, heads, head_dim, rope_dim, style, table.data(),
             positions.data());
    dev.rope(yd.floats() + head_dim - rope_dim, rows, row_stride, heads, head_dim, rope_dim, style, table.data(),
             positions.data());
    check_close(to_host(dev, yd, y.size()), y, f32_tol,
                style == gpu::rope_style::interleaved ? "rope interleaved" : "rope rotate-half");
  }
}

TEST_CASE("cuda: GQA attention over caches (decode and prefill) and MLA shared-row attention", "[cuda][gpu]") {
  REQUIRE_GPU();
  std::size_t heads = 8, kv_heads = 2, head_dim = 32, kv_dim = kv_heads * head_dim;
  std::size_t len_a = 300, len_b = 5;
  auto keys_a = random_floats(len_a * kv_dim, 13), values_a = random_floats(len_a * kv_dim, 14);
  auto keys_b = random_floats(len_b * kv_dim, 15), values_b = random_floats(len_b * kv_dim, 16);
  auto kad = to_dev(dev, keys_a), vad = to_dev(dev, values_a), kbd = to_dev(dev, keys_b), vbd = to_dev(dev, values_b);
  // A decode token of sequence a (all 300 positions), then a 5-token prefill of b (causal).
  std::vector<gpu::kv_rows> rows_ref{{keys_a.data(), values_a.data(), len_a}};
  std::vector<gpu::kv_rows> rows_dev{{kad.floats(), vad.floats(), len_a}};
  for (std::size_t t = 0; t < len_b; ++t) {
    rows_ref.push_back({keys_b.data(), values_b.data(), t + 1});
    rows_dev.push_back({kbd.floats(), vbd.floats(), t + 1});
  }
  std::size_t n = rows_ref.size();
  auto q = random_floats(n * heads * head_dim, 17, -3.0f, 3.0f);
  gpu::attention_shape shape{heads, kv_heads, head_dim, kv_dim, 1.0f / std::sqrt(float(head_dim))};
  std::vector<float> want(q.size());
  ref.attention(q.data(), rows_ref, shape, want.data());
  auto qd = to_dev(dev, q);
  auto od = dev.allocate(q.size() * sizeof(float));
  dev.attention(qd.floats(), rows_dev, shape, od.floats());
  check_close(to_host(dev, od, q.size()), want, f32_tol, "GQA attention");

  // MLA: rank 32 latent + 8 rope floats per row, value = the latent.
  std::size_t rank = 32, rope_dim = 8, row = rank + rope_dim, mla_heads = 4, len = 77;
  auto cache = random_floats(len * row, 18);
  auto cd = to_dev(dev, cache);
  std::vector<gpu::kv_rows> mref, mdev;
  for (std::size_t t : {std::size_t{77}, std::size_t{1}, std::size_t{40}}) {
    mref.push_back({cache.data(), nullptr, t});
    mdev.push_back({cd.floats(), nullptr, t});
  }
  gpu::mla_shape mshape{mla_heads, row, rank, row, 0.3f};
  auto mq = random_floats(mref.size() * mla_heads * row, 19, -2.0f, 2.0f);
  std::vector<float> mwant(mref.size() * mla_heads * rank);
  ref.mla_attention(mq.data(), mref, mshape, mwant.data());
  auto mqd = to_dev(dev, mq);
  auto mod = dev.allocate(mwant.size() * sizeof(float));
  dev.mla_attention(mqd.floats(), mdev, mshape, mod.floats());
  check_close(to_host(dev, mod, mwant.size()), mwant, f32_tol, "MLA attention");
}

TEST_CASE("cuda: router softmax + top-k, renormalised, scaled and group-limited", "[cuda][gpu]") {
  REQUIRE_GPU();
  std::size_t rows = 37;
  struct config {
    gpu::route_params p;
    const char* name;
  };
  for (const config& c : {config{{128, 8, 1, 1, true, 1.0f}, "qwen3 (128 experts top-8, renormalised)"},
                          config{{8, 2, 1, 1, false, 1.0f}, "mixtral-like (no renorm)"},
                          config{{64, 6, 8, 3, false, 2.5f}, "group-limited greedy (8 groups, top 3, scaled)"}}) {
    INFO(c.name);
    auto logits = random_floats(rows * c.p.num_experts, 20, -4.0f, 4.0f);
    std::vector<gpu::routed_slot> want(rows * c.p.top_k), got(rows * c.p.top_k);
    std::vector<float> l = logits;
    ref.route(l.data(), rows, c.p, want.data());
    auto ld = to_dev(dev, logits);
    dev.route(ld.floats(), rows, c.p, got.data());
    REQUIRE(dev.error().ok());
    for (std::size_t i = 0; i < want.size(); ++i) {
      CHECK(got[i].expert == want[i].expert);
      CHECK(std::fabs(got[i].weight - want[i].weight) <= 1e-5f * std::max(1.0f, std::fabs(want[i].weight)));
    }
  }
}

TEST_CASE("cuda: swiglu, sigmoid gate, add, row moves, weighted combine", "[cuda][gpu]") {
  REQUIRE_GPU();
  std::size_t rows = 13, dim = 96;
  auto gu = random_floats(rows * 2 * dim, 21, -6.0f, 6.0f);
  std::vector<float> want(rows * dim);
  ref.swiglu(gu.data(), rows, dim, want.data());
  auto gud = to_dev(dev, gu);
  auto outd = dev.allocate(want.size() * sizeof(float));
  dev.swiglu(gud.floats(), rows, dim, outd.floats());
  check_close(to_host(dev, outd, want.size()), want, f32_tol, "swiglu");

  auto gate = random_floats(rows, 22, -3.0f, 3.0f);
  auto gd = to_dev(dev, gate);
  ref.sigmoid_gate(gate.data(), rows, dim, want.data());
  dev.sigmoid_gate(gd.floats(), rows, dim, outd.floats());
  check_close(to_host(dev, outd, want.size()), want, f32_tol, "sigmoid gate");

  auto y = random_floats(rows * dim, 23);
  auto yd = to_dev(dev, y);
  ref.add(want.data(), y.data(), want.size());
  dev.add(outd.floats(), yd.floats(), want.size());
  check_close(to_host(dev, outd, want.size()), want, f32_tol, "add");

  // gather → scatter → copy_rows move bytes exactly.
  std::vector<std::size_t> pick{4, 0, 12, 4, 7};
  std::vector<const float*> src_ref, src_dev;
  for (std::size_t r : pick) {
    src_ref.push_back(y.data() + r * dim);
    src_dev.push_back(yd.floats() + r * dim);
  }
  std::vector<float> g_want(pick.size() * dim);
  ref.gather_rows(src_ref.data(), pick.size(), dim, g_want.data());
  auto g_dev = dev.allocate(g_want.size() * sizeof(float));
  dev.gather_rows(src_dev.data(), pick.size(), dim, g_dev.floats());
  CHECK(to_host(dev, g_dev, g_want.size()) == g_want);

  std::vector<float> s_want(rows * dim, 0.0f);
  auto s_dev = to_dev(dev, s_want);
  std::vector<float*> dst_ref, dst_dev;
  for (std::size_t r : {std::size_t{1}, std::size_t{9}, std::size_t{2}}) {
    dst_ref.push_back(s_want.data() + r * dim);
    dst_dev.push_back(s_dev.floats() + r * dim);
  }
  ref.scatter_rows(y.data() + 8, 2 * dim, 3, dim - 8, dst_ref.data());
  dev.scatter_rows(yd.floats() + 8, 2 * dim, 3, dim - 8, dst_dev.data());
  CHECK(to_host(dev, s_dev, s_want.size()) == s_want);

  ref.copy_rows(y.data(), dim, s_want.data() + 3, dim, 6, 50);
  dev.copy_rows(yd.floats(), dim, s_dev.floats() + 3, dim, 6, 50);
  CHECK(to_host(dev, s_dev, s_want.size()) == s_want);

  // weight_rows into slots, then the combine in slot order with a side output: the same
  // separately rounded products and sums as the cpu, so the bits agree.
  std::size_t top_k = 3;
  std::vector<float> slots_ref(rows * top_k * dim), side = random_floats(rows * dim, 24), x = random_floats(rows * dim, 25);
  auto slots_dev = dev.allocate(slots_ref.size() * sizeof(float));
  auto side_d = to_dev(dev, side), x_d = to_dev(dev, x);
  auto weights = random_floats(rows, 26, 0.0f, 1.0f);
  for (std::size_t s = 0; s < top_k; ++s) {
    std::vector<float*> out_ref, out_dev;
    for (std::size_t r = 0; r < rows; ++r) {
      out_ref.push_back(slots_ref.data() + (r * top_k + s) * dim);
      out_dev.push_back(slots_dev.floats() + (r * top_k + s) * dim);
    }
    ref.weight_rows(y.data(), rows, dim, weights.data(), out_ref.data());
    dev.weight_rows(yd.floats(), rows, dim, weights.data(), out_dev.data());
  }
  CHECK(to_host(dev, slots_dev, slots_ref.size()) == slots_ref);
  std::vector<const float*> w_ref, w_dev;
  for (std::size_t i = 0; i < rows * top_k; ++i) {
    w_ref.push_back(slots_ref.data() + i * dim);
    w_dev.push_back(slots_dev.floats() + i * dim);
  }
  ref.combine(w_ref.data(), top_k, side.data(), rows, dim, x.data());
  dev.combine(w_dev.data(), top_k, side_d.floats(), rows, dim, x_d.floats());
  CHECK(to_host(dev, x_d, x.size()) == x);
  // A dense layer: no routed slots, only the side output.
  ref.combine(nullptr, 0, side.data(), rows, dim, x.data());
  dev.combine(nullptr, 0, side_d.floats(), rows, dim, x_d.floats());
  CHECK(to_host(dev, x_d, x.size()) == x);
}

TEST_CASE("cuda: expert GEMMs grouped and dense agree with the cpu backend; the switch splits by rows",
          "[cuda][gpu]") {
  REQUIRE_GPU();
  std::size_t n = 96, k = 64;
  std::vector<std::size_t> rows{0, 1, 5, 40, 130, 3};
  for (dtype type : {dtype::f32, dtype::bf16}) {
    INFO(safetensors_name(type));
    std::vector<gpu::matrix> wr, wd;
    std::vector<std::vector<float>> xs, want;
    std::vector<gpu::buffer> xd, yd;
    for (std::size_t e = 0; e < rows.size(); ++e) {
      auto w = random_floats(n * k, 30 + std::uint32_t(e));
      std::vector<std::uint16_t> w16(w.size());
      for (std::size_t i = 0; i < w.size(); ++i)
        w16[i] = to_bf16(w[i]);
      gpu::matrix_part part = type == dtype::f32 ? gpu::matrix_part{w.data(), dtype::f32, n, k}
                                                 : gpu::matrix_part{w16.data(), dtype::bf16, n, k};
      auto r = ref.upload_matrix(type, k, {&part, 1});
      auto d = dev.upload_matrix(type, k, {&part, 1});
      REQUIRE(r.ok());
      REQUIRE(d.ok());
      wr.push_back(std::move(r).value());
      wd.push_back(std::move(d).value());
      xs.push_back(random_floats(std::max<std::size_t>(rows[e], 1) * k, 40 + std::uint32_t(e)));
      want.emplace_back(rows[e] * n);
      ref.matmul(xs[e].data(), rows[e], wr[e], want[e].data(), nullptr);
      xd.push_back(to_dev(dev, xs[e]));
      yd.push_back(dev.allocate(std::max<std::size_t>(rows[e], 1) * n * sizeof(float)));
    }
    float tol = type == dtype::f32 ? f32_tol : bf16_tol;
    struct mode {
      cuda::gemm_switch sw;
      std::size_t grouped, dense;
    };
    cuda::gemm_switch at_40{40, true, "test"};
    for (const mode& m : {mode{cuda::gemm_switch::always(cuda::gemm_kind::grouped), 5, 0},
                          mode{cuda::gemm_switch::always(cuda::gemm_kind::dense), 0, 5}, mode{at_40, 3, 2}}) {
      INFO(m.sw.source);
      dev.set_gemm_switch(m.sw);
      std::vector<cuda::expert_matmul> batch;
      for (std::size_t e = 0; e < rows.size(); ++e)
        batch.push_back({&wd[e], xd[e].floats(), yd[e].floats(), rows[e]});
      cuda::expert_gemm_stats stats;
      REQUIRE(dev.expert_matmuls(batch, &stats).ok());
      CHECK(stats.grouped_experts == m.grouped);
      CHECK(stats.dense_experts == m.dense);
      for (std::size_t e = 0; e < rows.size(); ++e)
        if (rows[e] > 0)
          check_close(to_host(dev, yd[e], rows[e] * n), want[e], tol, "expert GEMM");
    }
  }
  dev.set_gemm_switch(cuda::gemm_switch::uncalibrated_default());

  // A calibration installs a measured switch for its shape only.
  cuda::expert_gemm_shape shape{n, k, dtype::bf16, 4};
  std::vector<std::size_t> grid{1, 64, 512};
  auto sweep = dev.calibrate_gemm_switch(shape, grid, 3);
  REQUIRE(sweep.ok());
  REQUIRE(sweep->size() == 3);
  for (const cuda::gemm_timing& t : *sweep) {
    CHECK(t.grouped_ms > 0.0);
    CHECK(t.dense_ms > 0.0);
    CHECK(t.dense_peak_ms > 0.0);
  }
  CHECK(dev.gemm_switch_for(n, k, dtype::bf16).calibrated);
  CHECK_FALSE(dev.gemm_switch_for(n, k, dtype::f32).calibrated);
}

TEST_CASE("cuda: when_done calls back once the stream has run", "[cuda][gpu]") {
  REQUIRE_GPU();
  (void)ref;
  std::atomic<int> calls{0};
  auto big = dev.allocate(64u << 20);
  dev.copy(big.data(), big.data(), 0);
  dev.when_done([&] { calls.fetch_add(1); });
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (calls.load() == 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  CHECK(calls.load() == 1);
  CHECK(dev.checked_synchronize().ok());
}

// -- the fixtures through the CUDA backend -----------------------------------------------------

TEST_CASE("cuda: fixture greedy tokens through the CUDA backend equal the expected ones", "[cuda][gpu][fixture]") {
  REQUIRE_GPU();
  (void)ref;
  for (const char* name : {"qwen3_moe_tiny", "mixtral_tiny", "deepseek_v2_tiny"}) {
    INFO(name);
    auto dir = test::fixture_dir(name);
    if (dir.empty()) {
      test::skip_whole_binary(std::string{"../shared/fixtures/"} + name + " not found");
      return;
    }
    auto prompts = nlohmann::json::parse(std::ifstream{dir / "prompts.json"})
                       .get<std::vector<std::vector<std::int32_t>>>();
    auto expected = nlohmann::json::parse(std::ifstream{dir / "expected.json"});
    // Weights loaded on the shared test backend; the model runs on a second backend of the
    // same device (they share memory), as an engine's device executor would.
    auto loaded = model::load_checkpoint(dir, {}, dev);
    REQUIRE(loaded.ok());
    auto runner = cuda::cuda_backend::create(dev.device());
    REQUIRE(runner.ok());
    auto weights = std::make_shared<const model::model_weights>(std::move(loaded->weights));
    model::reference_model model{loaded->config, weights, std::unique_ptr<gpu::backend>(std::move(*runner))};
    std::vector<model::generation_request> requests;
    for (std::size_t i = 0; i < prompts.size(); ++i)
      requests.push_back({i, prompts[i], expected["greedy_steps"].get<std::size_t>(), {}});
    auto out = model::generate(model, requests, model::decode_mode::kv_cache);
    REQUIRE(out.ok());
    for (std::size_t i = 0; i < prompts.size(); ++i)
      CHECK((*out)[i] == expected["prompts"][i]["greedy"].get<std::vector<std::int32_t>>());
    CHECK(dev.error().ok());
  }
}

TEST_CASE("cuda: bf16 fixtures on CUDA give the cpu backend's bf16 logits within 2e-2", "[cuda][gpu][fixture]") {
  REQUIRE_GPU();
  (void)ref;
  for (const char* name : {"qwen3_moe_tiny", "mixtral_tiny", "deepseek_v2_tiny"}) {
    INFO(name);
    auto src = test::fixture_dir(name);
    if (src.empty()) {
      test::skip_whole_binary(std::string{"../shared/fixtures/"} + name + " not found");
      return;
    }
    temp_dir tmp;
    write_bf16_fixture(src, tmp.path);
    auto prompts = nlohmann::json::parse(std::ifstream{src / "prompts.json"})
                       .get<std::vector<std::vector<std::int32_t>>>();
    auto on_cpu = model::load_checkpoint(tmp.path);
    auto on_gpu = model::load_checkpoint(tmp.path, {}, dev);
    REQUIRE(on_cpu.ok());
    REQUIRE(on_gpu.ok());
    auto runner = cuda::cuda_backend::create(dev.device());
    REQUIRE(runner.ok());
    model::reference_model cpu_model{on_cpu->config, std::move(on_cpu->weights), 1};
    model::reference_model gpu_model{on_gpu->config,
                                     std::make_shared<const model::model_weights>(std::move(on_gpu->weights)),
                                     std::unique_ptr<gpu::backend>(std::move(*runner))};
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      model::kv_cache cpu_cache{cpu_model.config(), cpu_model.backend()};
      model::kv_cache gpu_cache{gpu_model.config(), gpu_model.backend()};
      std::vector<model::forward_segment> cs{{&cpu_cache, prompts[i]}}, gs{{&gpu_cache, prompts[i]}};
      auto want = cpu_model.forward(cs, model::logits_for::last_token);
      auto got = gpu_model.forward(gs, model::logits_for::last_token);
      REQUIRE(want.ok());
      REQUIRE(got.ok());
      check_close(*got, *want, bf16_tol, "bf16 last logits");
    }
    CHECK(dev.error().ok());
  }
}
