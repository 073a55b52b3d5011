#include <catch2/catch.hpp>

#include "policy/findep.hpp"
#include "policy/perf_model.hpp"
#include "policy/testbed_json.hpp"

#include <fstream>
#include <sstream>
#include <vector>

using namespace moert;
using namespace moert::policy;

namespace {

std::string read_config(const std::string& relative) {
  std::ifstream in{std::string(MOERT_SOURCE_DIR) + "/configs/" + relative};
  REQUIRE(in.good());
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

model_shape load_shape(const std::string& name) {
  auto shape = parse_model_shape(read_config("models/shapes/" + name + ".json"), name);
  REQUIRE(shape.ok());
  return *shape;
}

testbed paper_a() {
  auto bed = parse_testbed(read_config("testbeds/paper-a.json"), "paper-a.json");
  REQUIRE(bed.ok());
  return *bed;
}

}  // namespace

TEST_CASE("fit_linear recovers a line, reports R², and refuses degenerate input") {
  std::vector<double> x{1, 2, 3, 4, 5}, y;
  for (double v : x)
    y.push_back(0.5 + 2.0 * v);
  auto exact = fit_linear(x, y);
  REQUIRE(exact.ok());
  CHECK(exact->alpha == Approx(0.5));
  CHECK(exact->beta == Approx(2.0));
  CHECK(exact->r2 == Approx(1.0));

  std::vector<double> noisy{2.4, 4.6, 6.4, 8.7, 10.4};
  auto fit = fit_linear(x, noisy);
  REQUIRE(fit.ok());
  CHECK(fit->r2 < 1.0);
  CHECK(fit->r2 > 0.99);

  std::vector<double> below{0.5, 2.0, 3.1, 4.2};  // free intercept < 0
  auto free_fit = fit_linear(std::vector<double>{1, 2, 3, 4}, below);
  auto floor_fit = fit_linear_nonnegative(std::vector<double>{1, 2, 3, 4}, below);
  REQUIRE(free_fit.ok());
  REQUIRE(floor_fit.ok());
  CHECK(free_fit->alpha < 0);
  CHECK(floor_fit->alpha == 0);
  CHECK(floor_fit->beta == Approx((0.5 + 4.0 + 9.3 + 16.8) / 30.0));
  CHECK(floor_fit->r2 <= free_fit->r2);
  CHECK(fit_linear_nonnegative(x, y)->alpha == Approx(0.5));

  std::vector<double> same{3, 3, 3};
  CHECK_FALSE(fit_linear(same, same).ok());
  CHECK_FALSE(fit_linear(std::vector<double>{1}, std::vector<double>{1}).ok());
}

TEST_CASE("model shapes load from their Hugging Face-derived files") {
  for (const char* name : {"deepseek-v2", "deepseek-v2-lite", "qwen3-235b-a22b", "qwen3-30b-a3b", "mixtral-8x7b"}) {
    INFO(name);
    model_shape s = load_shape(name);
    CHECK(s.num_experts > 0);
    auto again = parse_model_shape(to_json(s), "round trip");
    REQUIRE(again.ok());
    CHECK(to_json(*again) == to_json(s));
  }
  model_shape ds = load_shape("deepseek-v2");
  // findep.md §4.1: 149.2 M MACs per token for the MLA projections; the MHA form of Eq. 1 with
  // d_k = 192, d_v = 128 gives 419.4 M.
  CHECK(attention_params(ds) == 149'225'472);
  double mha = 2.0 * 5120 * 128 * 192 + 2.0 * 5120 * 128 * 128;
  CHECK(mha / double(attention_params(ds)) == Approx(2.81).epsilon(0.01));
  CHECK(attention_core_macs_per_pair(ds) == 128 * (192 + 128));
  CHECK(kv_bytes_per_token_per_layer(ds) == 1152);
  CHECK(kv_bytes_per_token_per_layer(load_shape("qwen3-235b-a22b")) == 2048);
  CHECK(attention_gemms(load_shape("deepseek-v2-lite")).size() == 4);  // no q LoRA
  CHECK(ds.num_moe_layers() == 59);
}

TEST_CASE("task models keep Eq. 3's factor 3 in the expert term") {
  model_shape ds = load_shape("deepseek-v2");
  testbed bed = paper_a();
  auto t = make_task_models(ds, bed, 3, 5, 1024);
  REQUIRE(t.ok());
  CHECK(t->expert.alpha == Approx(3 * 32 * 0.17));
  CHECK(t->expert.beta == Approx(3 * 32 * 8.59e-11 * 5120 * 1536));
  CHECK(t->shared.alpha == Approx(2 * 3 * 0.17));
  CHECK(t->shared.beta == Approx(2 * 3 * 8.59e-11 * 1024 * 5120 * 1536));
  CHECK(t->attention.alpha == Approx(5 * 0.17 + 0.15));
  CHECK(t->attention.beta ==
        Approx(8.59e-11 * 1024 * 149'225'472.0 + 1.54e-11 * 1024.0 * 1024 * 128 * 320));
  CHECK(t->a2e.alpha == Approx(0.1));  // comm_default: (3, 5) was not fitted by the paper
  CHECK(t->a2e.beta == Approx(1.5e-6 * 32 * 5120 * 2));
  CHECK(t->tokens_per_sample == Approx(3.0 * 6 * 1024 / 160));
  auto fitted = make_task_models(load_shape("qwen3-235b-a22b"), bed, 4, 4, 2048);
  REQUIRE(fitted.ok());
  CHECK(fitted->a2e.alpha == Approx(0.37));
  CHECK(fitted->shared.alpha == 0.0);

  testbed no_default = bed;
  no_default.comm_default.reset();
  auto missing = make_task_models(ds, no_default, 3, 5, 1024);
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.err().message.find("ag 3, eg 5") != std::string::npos);
}

TEST_CASE("testbed JSON round-trips and errors name the key") {
  testbed bed = paper_a();
  CHECK(bed.gemm.beta == 8.59e-11);
  CHECK(bed.comm.size() == 3);
  CHECK(bed.notes.find("Factor-3") != std::string::npos);
  auto again = parse_testbed(to_json(bed), "round trip");
  REQUIRE(again.ok());
  CHECK(to_json(*again) == to_json(bed));

  auto err = [](std::string_view text) {
    auto r = parse_testbed(text, "t.json");
    REQUIRE_FALSE(r.ok());
    return r.err().message;
  };
  std::string base = R"("name": "x", "device_memory_gib": 8, "gemm": {"alpha": 0, "beta": 1e-9},
                        "attention": {"alpha": 0, "beta": 1e-9})";
  CHECK(parse_testbed("{" + base + R"(, "comm_default": {"alpha": 0, "beta": 1e-6}})", "t").ok());
  CHECK(err("{" + base + "}").find("'comm'") != std::string::npos);
  CHECK(err("{" + base + R"(, "comm": [{"ag": 1, "alpha": 0, "beta": 1}]})").find("'comm[0].eg' is missing") !=
        std::string::npos);
  CHECK(err("{" + base + R"(, "gemm_typo": 1})").find("'gemm_typo' is not a known key") != std::string::npos);
  CHECK(err(R"({"name": "x", "device_memory_gib": 8, "gemm": {"alpha": 0, "beta": -1}})").find("'gemm.beta'") !=
        std::string::npos);
  CHECK(err("not json").find("not valid JSON") != std::string::npos);

  auto shape_err = parse_model_shape(R"({"name": "m", "num_layers": 2, "hidden": 8, "num_experts": 4,
      "top_k": 2, "expert_intermediate": 8, "vocab": 10, "attention": {"kind": "gqa", "num_heads": 4,
      "num_kv_heads": 3, "head_dim": 2}})", "m.json");
  REQUIRE_FALSE(shape_err.ok());
  CHECK(shape_err.err().message.find("'attention.num_kv_heads'") != std::string::npos);
}

TEST_CASE("a GPU testbed carries the calibrated grouped/dense expert GEMM crossover") {
  std::string base = R"({"name": "g", "device_memory_gib": 139, "gemm": {"alpha": 0, "beta": 1e-12},
                        "attention": {"alpha": 0, "beta": 1e-12}, "comm_default": {"alpha": 0, "beta": 1e-9})";
  auto plain = parse_testbed(base + "}", "g.json");
  REQUIRE(plain.ok());
  CHECK_FALSE(plain->expert_gemm.has_value());
  auto bed = parse_testbed(base + R"(, "expert_gemm": {"dense_min_rows": 384, "source": "H200, bf16"}})", "g.json");
  REQUIRE(bed.ok());
  REQUIRE(bed->expert_gemm.has_value());
  CHECK(bed->expert_gemm->dense_min_rows == std::optional<std::size_t>{384});
  CHECK(bed->expert_gemm->source == "H200, bf16");
  auto again = parse_testbed(to_json(*bed), "round trip");
  REQUIRE(again.ok());
  CHECK(to_json(*again) == to_json(*bed));
  auto never = parse_testbed(base + R"(, "expert_gemm": {"dense_min_rows": null}})", "g.json");
  REQUIRE(never.ok());
  CHECK_FALSE(never->expert_gemm->dense_min_rows.has_value());
  CHECK(parse_testbed(to_json(*never), "round trip")->expert_gemm.has_value());
  auto zero = parse_testbed(base + R"(, "expert_gemm": {"dense_min_rows": 0}})", "g.json");
  REQUIRE_FALSE(zero.ok());
  CHECK(zero.err().message.find("'expert_gemm.dense_min_rows' must be positive") != std::string::npos);
  auto typo = parse_testbed(base + R"(, "expert_gemm": {"rows": 4}})", "g.json");
  REQUIRE_FALSE(typo.ok());
  CHECK(typo.err().message.find("'expert_gemm.rows' is not a known key") != std::string::npos);
}

TEST_CASE("the memory model reproduces the reference's byte counts") {
  model_shape ds = load_shape("deepseek-v2");
  auto mem = make_memory_model(ds, paper_a(), 3, 5, 4096, 16, 0);
  REQUIRE(mem.ok());
  // 16 layers of experts at eg = 5: 16·32·3·5120·1536·2 B ≈ 24.2 GB (findep.md §11.1).
  CHECK(mem->eg_weight_bytes == Approx(16.0 * 32 * 3 * 5120 * 1536 * 2));
  CHECK(mem->ag_resident_per_sample == Approx(16.0 * 4096 * 1152 + 4096.0 * 5120 * 2));
  auto too_many = make_memory_model(ds, paper_a(), 3, 5, 4096, 60, 0);
  REQUIRE(too_many.ok());
  findep_instance inst{};
  inst.memory = *too_many;
  inst.num_layers = 60;
  inst.ag = 3;
  inst.seq_len = 4096;
  auto plan = solve(inst);
  REQUIRE_FALSE(plan.ok());
  CHECK(plan.err().message.find("infeasible: needs") == 0);
  CHECK(plan.err().message.find("expert-group device") != std::string::npos);
}
