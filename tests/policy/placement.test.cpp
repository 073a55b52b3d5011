#include <catch2/catch.hpp>

#include "policy/placement.hpp"
#include "policy/testbed_json.hpp"

#include <fstream>
#include <sstream>

using namespace moert;
using namespace moert::policy;

namespace {

// The bench checkpoint's shape (../shared/peers/make_bench_checkpoint.py): 8 layers, hidden
// 1024, 16/4 heads of 64, 32 experts top-4 of intermediate 512, vocab 4096.
model_shape bench_shape() {
  model_shape s;
  s.name = "qwen3_moe";
  s.num_layers = 8;
  s.hidden = 1024;
  s.num_experts = 32;
  s.top_k = 4;
  s.expert_intermediate = 512;
  s.attention = attention_kind::gqa;
  s.gqa = {16, 4, 64};
  s.vocab = 4096;
  s.dtype_bytes = 4;
  return s;
}

testbed cpu_testbed() {
  std::ifstream in{std::string{MOERT_SOURCE_DIR} + "/configs/testbeds/cpu.json"};
  std::stringstream text;
  text << in.rdbuf();
  auto bed = parse_testbed(text.str(), "configs/testbeds/cpu.json");
  REQUIRE(bed.ok());
  return *bed;
}

}  // namespace

TEST_CASE("the calibrated cpu testbed says it was measured with 2 threads") {
  CHECK(cpu_testbed().threads == 2);
}

TEST_CASE("scaling a testbed to fewer threads stretches compute, not start-up or copies") {
  testbed bed = cpu_testbed();
  testbed one = scaled_to_threads(bed, 1);
  CHECK(one.threads == 1);
  CHECK(one.gemm.beta == Approx(2 * bed.gemm.beta));
  CHECK(one.attention.beta == Approx(2 * bed.attention.beta));
  CHECK(one.shared_expert->beta == Approx(2 * bed.shared_expert->beta));
  CHECK(one.gemm.alpha == bed.gemm.alpha);
  CHECK(one.comm_default->beta == bed.comm_default->beta);
}

TEST_CASE("on 2 cores the cpu testbed co-locates attention and experts on one 2-thread device") {
  auto choice = choose_placement(bench_shape(), cpu_testbed(), 2);
  REQUIRE(choice.ok());
  CHECK(choice->chosen.colocated);
  CHECK(choice->chosen.threads_per_device == 2);
  REQUIRE(choice->candidates.size() == 2);  // co-located, and 1 + 1 of 1 thread each
  const placement_candidate& split = choice->candidates[1];
  CHECK(!split.colocated);
  CHECK(split.ag == 1);
  CHECK(split.eg == 1);
  CHECK(split.threads_per_device == 1);
  // Each half-width task takes twice as long; even perfect overlap only gets back to the
  // co-located time, and A2E/E2A come on top.
  CHECK(choice->candidates[0].throughput > split.throughput);
  CHECK(choice->reason.find("co-located") == 0);
}

TEST_CASE("one core has nothing to split") {
  auto choice = choose_placement(bench_shape(), cpu_testbed(), 1);
  REQUIRE(choice.ok());
  CHECK(choice->chosen.colocated);
  CHECK(choice->candidates.size() == 1);
}

TEST_CASE("where start-up dominates and copies are free, disaggregation overlaps it and wins") {
  testbed bed = cpu_testbed();
  bed.threads = 1;
  bed.gemm = {1.0, 1e-15, 1.0};  // 1 ms per GEMM whatever its size: threads do not help
  bed.attention = {0.0, 1e-15, 1.0};
  bed.shared_expert.reset();
  bed.comm_default = linear_fit{0.0, 0.0, 1.0};
  auto choice = choose_placement(bench_shape(), bed, 4);
  REQUIRE(choice.ok());
  CHECK(!choice->chosen.colocated);
  CHECK(choice->chosen.ag + choice->chosen.eg <= 4);
  CHECK(choice->chosen.throughput > choice->candidates[0].throughput);
  CHECK(choice->reason.find("disaggregated") == 0);
}

TEST_CASE("bad placement arguments are errors naming them") {
  auto none = choose_placement(bench_shape(), cpu_testbed(), 0);
  REQUIRE(!none.ok());
  CHECK(none.err().what().find("cores") != std::string::npos);
  auto empty = choose_placement(bench_shape(), cpu_testbed(), 2, {0, 1});
  REQUIRE(!empty.ok());
  CHECK(empty.err().what().find("sequence") != std::string::npos);
}

TEST_CASE("a testbed's threads survive JSON, and 0 threads is refused") {
  testbed bed = cpu_testbed();
  bed.threads = 3;
  auto back = parse_testbed(to_json(bed), "round trip");
  REQUIRE(back.ok());
  CHECK(back->threads == 3);
  std::string text = to_json(bed);
  auto at = text.find("\"threads\": 3");
  REQUIRE(at != std::string::npos);
  text.replace(at, 12, "\"threads\": 0");
  auto zero = parse_testbed(text, "zero threads");
  REQUIRE(!zero.ok());
  CHECK(zero.err().what().find("threads") != std::string::npos);
}
