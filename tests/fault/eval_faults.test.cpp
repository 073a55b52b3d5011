// `moert eval --faults FILE` as a user runs it: a recoverable fault file writes exactly the
// fault-free output and reports what it injected; an unrecoverable one (every message lost)
// ends with an error naming the cause and a non-zero exit, without hanging; a bad file is
// refused naming the key.
#include <catch2/catch.hpp>

#include "test_support.hpp"

#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>

namespace fs = std::filesystem;

namespace {

using moert::test::slurp;

fs::path scratch() {
  fs::path dir = fs::temp_directory_path() / ("moert_eval_faults_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return dir;
}

// `timeout`: a hang fails the test instead of the suite's timeout.
moert::test::command_result run(const std::string& args) {
  return moert::test::run_command(MOERT_BINARY, args, scratch(), 120);
}

}  // namespace

TEST_CASE("moert eval --faults: recoverable faults write exactly the fault-free output") {
  fs::path model = moert::test::fixture_dir("qwen3_moe_tiny");
  if (model.empty())
    moert::test::skip_whole_binary("../shared/fixtures not found");
  fs::path dir = scratch();
  std::string common = "eval --model " + model.string() + " --prompts " + (model / "prompts.json").string() +
                       " --greedy 8 --ag 2 --eg 3";
  auto clean = run(common + " --out " + (dir / "clean.json").string());
  INFO(clean.err);
  REQUIRE(clean.exit_code == 0);
  // The issue's message faults and slow device (kills are the supervision tests'), with
  // short retransmission timeouts.
  std::ofstream{dir / "faults.json"} << R"({"seed": 7, "drop": 0.05, "duplicate": 0.05, "reorder": 0.05,
    "delay": {"probability": 0.1, "max_ms": 3}, "slow": [{"device": "expert:1", "factor": 3}],
    "retransmit": {"ms": 5, "max_ms": 40, "max_retries": 30}})";
  auto faulty = run(common + " --faults " + (dir / "faults.json").string() + " --faults-report " +
                    (dir / "report.json").string() + " --out " + (dir / "faulty.json").string());
  INFO(faulty.err);
  REQUIRE(faulty.exit_code == 0);
  CHECK(slurp(dir / "faulty.json") == slurp(dir / "clean.json"));  // byte for byte
  CHECK(faulty.out.find("faults injected") != std::string::npos);
  auto report = nlohmann::json::parse(slurp(dir / "report.json"));
  CHECK(report["dropped"].get<int>() > 0);
  CHECK(report["duplicated"].get<int>() > 0);
  CHECK(report["reordered"].get<int>() > 0);
  CHECK(report["delayed"].get<int>() > 0);
  CHECK(report["slowed_tasks"].get<int>() > 0);
  CHECK(report["retransmitted"].get<int>() > 0);
  CHECK(report["failed_micro_batches"].get<int>() == 0);
  CHECK(report["requests_ended_error"].get<int>() == 0);
}

TEST_CASE("moert eval --faults: an unrecoverable plan fails naming the cause, without hanging") {
  fs::path model = moert::test::fixture_dir("qwen3_moe_tiny");
  if (model.empty())
    moert::test::skip_whole_binary("../shared/fixtures not found");
  fs::path dir = scratch();
  std::ofstream{dir / "lost.json"} << R"({"drop": 1, "retransmit": {"ms": 2, "max_ms": 8, "max_retries": 3}})";
  auto lost = run("eval --model " + model.string() + " --prompts " + (model / "prompts.json").string() +
                  " --greedy 4 --ag 2 --eg 3 --faults " + (dir / "lost.json").string() + " --out " +
                  (dir / "o.json").string());
  INFO(lost.err);
  CHECK(lost.exit_code != 0);
  CHECK(lost.exit_code != 124);  // not the timeout
  CHECK(lost.err.find("did not answer layer") != std::string::npos);
  CHECK(lost.err.find("after 3 retransmissions") != std::string::npos);

  std::ofstream{dir / "bad.json"} << R"({"drop": 0.1, "kill": [{"actor": "router", "device": 0}]})";
  auto bad = run("eval --model " + model.string() + " --prompts " + (model / "prompts.json").string() +
                 " --faults " + (dir / "bad.json").string() + " --out " + (dir / "o.json").string());
  CHECK(bad.exit_code != 0);
  CHECK(bad.err.find("'kill[0].actor' must be expert, attention or queue") != std::string::npos);
}
