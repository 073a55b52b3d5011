// The `moert` binary as a user runs it: the default job works, eval writes the fixture
// layout, and bad input gives one clear error line and a non-zero exit.
#include <catch2/catch.hpp>

#include "test_support.hpp"

#include <nlohmann/json.hpp>

#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

namespace fs = std::filesystem;

namespace {

using moert::test::slurp;

fs::path scratch_dir() {
  fs::path dir = fs::temp_directory_path() / ("moert_cli_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return dir;
}

moert::test::command_result run(const std::string& args) {
  return moert::test::run_command(MOERT_BINARY, args, scratch_dir());
}

void write(const fs::path& path, const std::string& text) {
  std::ofstream{path} << text;
}

void expect_error(const std::string& args, const std::string& needle) {
  INFO("moert " << args);
  auto r = run(args);
  INFO("stderr: " << r.err);
  CHECK(r.exit_code != 0);
  CHECK(r.err.find(needle) != std::string::npos);
  CHECK(r.err.find("moert: error: ") == 0);
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
}

}  // namespace

// The "request N: …" and "  -> …" lines of a generate run.
std::string generated_lines(const std::string& out) {
  std::istringstream in{out};
  std::string line, kept;
  while (std::getline(in, line))
    if (line.rfind("request ", 0) == 0 || line.rfind("  -> ", 0) == 0)
      kept += line + "\n";
  return kept;
}

TEST_CASE("generate runs the embedded default through the engine, same tokens as the reference") {
  auto r = run("generate --batch 2 --max-new-tokens 4 --ag 2 --eg 2 --r1 2 --order AASS");
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("embedded default") != std::string::npos);
  CHECK(r.out.find("request 2:") != std::string::npos);
  CHECK(r.out.find("tokens/s") != std::string::npos);
  CHECK(r.out.find("executions per (layer, wave)") != std::string::npos);
  auto reference = run("generate --batch 2 --max-new-tokens 4 --reference --threads 2");
  REQUIRE(reference.exit_code == 0);
  CHECK(reference.out.find("reference forward") != std::string::npos);
  CHECK(generated_lines(reference.out) == generated_lines(r.out));
  CHECK_FALSE(generated_lines(r.out).empty());
}

TEST_CASE("generate without placement flags runs the testbed's placement, same tokens as the reference") {
  auto r = run("generate --batch 3 --max-new-tokens 4");
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  // The calibrated cpu testbed's choice, and why (policy/placement.hpp).
  CHECK(r.out.find("predicted at batch 16 from testbed cpu") != std::string::npos);
  auto reference = run("generate --batch 3 --max-new-tokens 4 --reference");
  REQUIRE(reference.exit_code == 0);
  CHECK(generated_lines(reference.out) == generated_lines(r.out));
  CHECK_FALSE(generated_lines(r.out).empty());
}

TEST_CASE("generate --trace writes a Chrome trace with a track per device") {
  fs::path trace = scratch_dir() / "trace.json";
  auto r = run("generate --batch 1 --max-new-tokens 2 --eg 2 --trace " + trace.string());
  REQUIRE(r.exit_code == 0);
  auto json = nlohmann::json::parse(slurp(trace));
  std::set<std::string> tracks;
  std::set<std::string> phases;
  for (const auto& e : json["traceEvents"]) {
    phases.insert(e["ph"].get<std::string>());
    if (e["ph"] == "M")
      tracks.insert(e["args"]["name"].get<std::string>());
  }
  // A track per device for its kernels, and one beside it for the actors its thread runs.
  CHECK(tracks == std::set<std::string>{"attention 0", "attention 0 actors", "expert 0", "expert 0 actors",
                                        "expert 1", "expert 1 actors"});
  CHECK(phases.count("X"));  // kernel slices
  CHECK(phases.count("s"));  // A2E / E2A flow arrows
  CHECK(phases.count("f"));
}

TEST_CASE("inspect prints the components") {
  auto r = run("inspect");
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("routed experts") != std::string::npos);
  CHECK(r.out.find("KV cache") != std::string::npos);
}

TEST_CASE("bench --model prints llama-bench's figures for the engine and the reference, and how to rerun") {
  auto fixture = moert::test::fixture_dir("qwen3_moe_tiny");
  if (fixture.empty())
    return;  // the eval test below marks the binary skipped
  auto r = run("bench --model " + fixture.string() + " --reps 2 --pp 16 --tg 4 --tg-batch 3 --tg-prompt 2");
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("# reproduce: moert bench --model " + fixture.string() + " --reps 2 --pp 16 --tg 4") !=
        std::string::npos);
  for (const char* needle : {"| reference forward, 2 threads", "| engine, default placement", "prompt 16",
                             "decode, 1 sequence", "decode, 3 sequences", "held ",
                             "| median of per-pair ratios", "runs in pairs, back to back"})
    CHECK(r.out.find(needle) != std::string::npos);

  auto inspect = run("inspect --model " + fixture.string());
  REQUIRE(inspect.exit_code == 0);
  CHECK(inspect.out.find("resident weights") != std::string::npos);
}

TEST_CASE("the embedded bench times one workload and writes a trace of each engine configuration") {
  fs::path traces = scratch_dir() / "bench_traces";
  fs::create_directories(traces);
  auto r = run("bench --reps 1 --only decode --layers 2 --hidden 64 --experts 8 --top-k 2 --expert-intermediate 64 "
               "--decode-batch 8 --decode-steps 2 --trace " + traces.string());
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("## decode") != std::string::npos);
  CHECK(r.out.find("## prefill") == std::string::npos);
  CHECK(r.out.find("--only decode") != std::string::npos);  // in the reproduce line
  // Where an overlap plan's time goes, from its report and the no-overlap run's.
  CHECK(r.out.find("expert work ") != std::string::npos);
  CHECK(r.out.find("expert device busy ") != std::string::npos);
  CHECK(r.out.find("per back-to-back pair ") != std::string::npos);
  CHECK(r.out.find("# an expert (median of 16, one thread") != std::string::npos);  // 2 layers x 8 experts
  // The FinDEP plan under the default scheduler (defrag) is the "findep" row: traced once.
  CHECK_FALSE(fs::exists(traces / "decode-findep-defrag.json"));
  for (const char* tag : {"single", "serial", "pppipe", "findep", "findep-mtfs", "findep-flfs"}) {
    std::string trace = slurp(traces / ("decode-" + std::string{tag} + ".json"));
    INFO(tag);
    CHECK(trace.find("\"traceEvents\"") != std::string::npos);
    CHECK(trace.find("expert L1 E") != std::string::npos);  // the experts' tasks are in it
  }
  auto bad = run("bench --only decoding");  // CLI11's own check: not a bench run
  CHECK(bad.exit_code != 0);
  CHECK(bad.err.find("--only") != std::string::npos);
  CHECK(bad.out.find("## decode") == std::string::npos);
}

TEST_CASE("eval writes the fixture layout and matches its greedy tokens") {
  auto fixture = moert::test::fixture_dir("qwen3_moe_tiny");
  if (fixture.empty()) {
    moert::test::skip_whole_binary("../shared/fixtures/qwen3_moe_tiny not found");
    return;
  }
  fs::path out = scratch_dir() / "eval.json";
  auto r = run("eval --model " + fixture.string() + " --prompts " + (fixture / "prompts.json").string() +
               " --greedy 8 --ag 2 --eg 3 --r2 2 --out " + out.string());
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  auto got = nlohmann::json::parse(slurp(out));
  auto want = nlohmann::json::parse(slurp(fixture / "expected.json"));
  REQUIRE(got["prompts"].size() == want["prompts"].size());
  for (std::size_t i = 0; i < got["prompts"].size(); ++i) {
    CHECK(got["prompts"][i]["greedy"] == want["prompts"][i]["greedy"]);
    const auto& logits = got["prompts"][i]["last_logits"];
    REQUIRE(logits.size() == want["prompts"][i]["last_logits"].size());
    for (std::size_t v = 0; v < logits.size(); ++v)
      REQUIRE(std::abs(logits[v].get<double>() - want["prompts"][i]["last_logits"][v].get<double>()) <= 1e-3);
    const auto& argmax = got["prompts"][i]["argmax"];
    REQUIRE(argmax.size() == want["prompts"][i]["argmax"].size());
    for (std::size_t p = 0; p < argmax.size(); ++p)
      if (want["prompts"][i]["argmax_margin"][p].get<double>() >= 2e-3)
        CHECK(argmax[p] == want["prompts"][i]["argmax"][p]);
  }
}

TEST_CASE("bad input: one clear error line, non-zero exit") {
  fs::path dir = scratch_dir();
  auto fixture = moert::test::fixture_dir("qwen3_moe_tiny");
  expect_error("generate --model /nonexistent/dir", "/nonexistent/dir");
  fs::create_directories(dir / "bad_json");
  write(dir / "bad_json" / "config.json", "{\"model_type\": ");
  expect_error("inspect --model " + (dir / "bad_json").string(), "not valid JSON");
  fs::create_directories(dir / "f64");
  write(dir / "f64" / "config.json",
        R"({"model_type": "qwen3_moe", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 4,
        "torch_dtype": "float64"})");
  expect_error("inspect --model " + (dir / "f64").string(), "float64");
  expect_error("generate --prompt 1,99999", "token id 99999");
  expect_error("generate --prompt ,", "--prompt is empty");
  // -n 2^64-1 used to wrap the KV reservation and run until memory ran out.
  expect_error("generate -n 18446744073709551615", "max_position_embeddings");
  expect_error("generate --reference -n 18446744073709551615", "max_position_embeddings");
  // A node's grouped/dense switch comes from this machine's calibration, checked before it listens.
  expect_error("node --gemm-testbed /nonexistent/bed.json", "/nonexistent/bed.json");
  expect_error("node --gemm-testbed cpu", "has no \"expert_gemm\"");
  if (!fixture.empty()) {
    std::string model = " --model " + fixture.string();
    write(dir / "big_id.json", "[[1, 2, 384]]");
    expect_error("eval" + model + " --prompts " + (dir / "big_id.json").string() + " --out " + (dir / "o.json").string(),
                 "token id 384");
    write(dir / "empty.json", "[[1], []]");
    expect_error("eval" + model + " --prompts " + (dir / "empty.json").string() + " --out " + (dir / "o.json").string(),
                 "prompt 1 is empty");
    write(dir / "notjson.json", "[[1, 2");
    expect_error("eval" + model + " --prompts " + (dir / "notjson.json").string() + " --out " + (dir / "o.json").string(),
                 "not valid JSON");
  }
}

// --backend cuda on a machine that cannot run it (no CUDA build, or no GPU): every command that
// takes it fails at once with one line naming the reason. Where it can run, generate gives the
// cpu backend's greedy tokens.
TEST_CASE("backend cuda where it cannot run: one clear error line, non-zero exit", "[gpu]") {
  auto probe = run("generate --reference -n 8 --backend cuda");
  if (probe.exit_code == 0) {
    // A GPU: the reference forward and the engine's actor path on it give the cpu backend's
    // greedy tokens.
    auto cpu = run("generate --reference -n 8 --backend cpu");
    REQUIRE(cpu.exit_code == 0);
    CHECK(probe.out.find("on cuda") != std::string::npos);
    CHECK(generated_lines(probe.out) == generated_lines(cpu.out));
    auto engine_cuda = run("generate -n 8 --backend cuda");
    auto engine_cpu = run("generate -n 8 --backend cpu");
    REQUIRE(engine_cuda.exit_code == 0);
    REQUIRE(engine_cpu.exit_code == 0);
    CHECK(generated_lines(engine_cuda.out) == generated_lines(engine_cpu.out));
    CHECK(engine_cuda.out.find("expert GEMM switch") != std::string::npos);
    return;
  }
  INFO("stderr: " << probe.err);
  bool compiled = probe.err.find("not compiled into this build") == std::string::npos;
  std::string reason = compiled ? "backend 'cuda' cannot run here: no CUDA device" : "not compiled into this build";
  expect_error("generate -n 4 --backend cuda", reason);
  expect_error("generate -n 4 --backend cuda --ag 2 --eg 2", reason);
  expect_error("bench --backend cuda --reps 1", reason);
  expect_error("serve --port 0 --backend cuda", reason);
  expect_error("generate --reference --backend cuda", reason);
  expect_error("calibrate --backend cuda", compiled ? "no CUDA device" : "not compiled into this build");
  expect_error("generate --backend tpu", "--backend 'tpu': expected cpu or cuda");
  auto fixture = moert::test::fixture_dir("qwen3_moe_tiny");
  if (!fixture.empty()) {
    fs::path dir = scratch_dir();
    write(dir / "prompts.json", "[[1, 2, 3]]");
    expect_error("eval --model " + fixture.string() + " --prompts " + (dir / "prompts.json").string() + " --out " +
                     (dir / "o.json").string() + " --backend cuda",
                 reason);
  }
}
