// `moert tokenize` as the acceptance check runs it: one REQ.json with every encode, decode and
// chat case of a fixture's cases.json, answered exactly; bad input gives one error line, exit 1.
#include <catch2/catch.hpp>

#include "test_support.hpp"

#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const char* const k_names[] = {"qwen3", "deepseek_v3", "mistral"};

struct run_result {
  int exit_code;
  std::string out;
  std::string err;
};

using moert::test::slurp;

fs::path scratch_dir() {
  fs::path dir = fs::temp_directory_path() / ("moert_tokenize_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return dir;
}

run_result run(const std::string& args) {
  fs::path dir = scratch_dir();
  std::string cmd = std::string{MOERT_BINARY} + " " + args + " >" + (dir / "stdout").string() + " 2>" +
                    (dir / "stderr").string();
  int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(dir / "stdout"), slurp(dir / "stderr")};
}

fs::path tokenizer_dir(const std::string& name) {
  fs::path dir = fs::path{MOERT_FIXTURES_DIR} / "tokenizers" / name;
  return fs::exists(dir / "cases.json") ? dir : fs::path{};
}

struct expected_item {
  std::string kind;  // encode, decode, chat
  std::string note;
  json answer;
};

// Runs every case of `name` through one `moert tokenize` call; returns requests and answers.
std::pair<std::vector<expected_item>, json> run_all_cases(const std::string& name) {
  fs::path dir = tokenizer_dir(name);
  json cases = json::parse(slurp(dir / "cases.json"));
  json items = json::array();
  std::vector<expected_item> expected;
  for (const auto& c : cases["encode"]) {
    items.push_back({{"text", c["text"]}, {"add_special_tokens", c["add_special_tokens"]}});
    expected.push_back({"encode", c["note"], {{"ids", c["ids"]}, {"text", c["decoded"]}}});
  }
  for (const auto& c : cases["decode"]) {
    items.push_back({{"ids", c["ids"]}});
    expected.push_back({"decode", c["note"], {{"text", c["text"]}}});
  }
  for (const auto& c : cases["chat"]) {
    items.push_back({{"messages", c["messages"]}, {"add_generation_prompt", c["add_generation_prompt"]}});
    json answer = c.contains("error") ? json{{"error", c["error"]}} : json{{"text", c["text"]}, {"ids", c["ids"]}};
    expected.push_back({"chat", c["note"], answer});
  }
  fs::path req = scratch_dir() / (name + "_req.json");
  fs::path out = scratch_dir() / (name + "_out.json");
  std::ofstream{req} << json{{"items", items}}.dump();
  auto r = run("tokenize --tokenizer " + dir.string() + " --in " + req.string() + " --out " + out.string());
  INFO(name << " stderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  json answers = json::parse(slurp(out));
  REQUIRE(answers["items"].size() == expected.size());
  return {expected, answers["items"]};
}

void check_kind(const std::string& kind) {
  for (const char* name : k_names) {
    if (tokenizer_dir(name).empty()) {
      moert::test::skip_whole_binary("../shared/fixtures/tokenizers/" + std::string{name} + " not found");
      return;
    }
    auto [expected, answers] = run_all_cases(name);
    for (std::size_t i = 0; i < expected.size(); ++i) {
      if (expected[i].kind != kind)
        continue;
      INFO(name << " " << kind << ": " << expected[i].note);
      CHECK(answers[i].dump() == expected[i].answer.dump());
    }
  }
}

void expect_error(const std::string& args, const std::string& needle) {
  INFO("moert " << args);
  auto r = run(args);
  INFO("stderr: " << r.err);
  CHECK(r.exit_code == 1);
  CHECK(r.err.rfind("moert: error: ", 0) == 0);
  CHECK(r.err.find(needle) != std::string::npos);
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
}

}  // namespace

TEST_CASE("moert tokenize answers every encode case exactly") {
  check_kind("encode");
}

TEST_CASE("moert tokenize answers every decode case exactly") {
  check_kind("decode");
}

TEST_CASE("moert tokenize answers every chat case exactly (rendered text, ids, or the template's error)") {
  check_kind("chat");
}

TEST_CASE("moert tokenize: bad input is one error line and exit code 1") {
  fs::path dir = tokenizer_dir("mistral");
  if (dir.empty()) {
    moert::test::skip_whole_binary("../shared/fixtures/tokenizers/mistral not found");
    return;
  }
  fs::path tmp = scratch_dir();
  auto with_request = [&](const std::string& file, const std::string& text) {
    std::ofstream{tmp / file} << text;
    return "tokenize --tokenizer " + dir.string() + " --in " + (tmp / file).string() + " --out " +
           (tmp / "out.json").string();
  };
  std::ofstream{tmp / "ok.json"} << R"({"items": []})";
  expect_error("tokenize --tokenizer " + (tmp / "nowhere").string() + " --in " + (tmp / "ok.json").string() +
                   " --out " + (tmp / "out.json").string(),
               "tokenizer.json");
  expect_error("tokenize --tokenizer " + dir.string() + " --in " + (tmp / "missing.json").string() + " --out " +
                   (tmp / "out.json").string(),
               "missing.json");
  expect_error(with_request("malformed.json", R"({"items": [)"), "malformed JSON");
  expect_error(with_request("no_items.json", R"({"things": []})"), "items");
  expect_error(with_request("shape.json", R"({"items": [{"text": "a"}, {"tokens": [1]}]})"), "items[1]");
  expect_error(with_request("both.json", R"({"items": [{"text": "a", "ids": [1]}]})"), "items[0]");
  expect_error(with_request("range.json", R"({"items": [{"ids": [1, 32000]}]})"), "32000");
  expect_error(with_request("negative.json", R"({"items": [{"ids": [-1]}]})"), "-1");
  expect_error(with_request("type.json", R"({"items": [{"ids": ["a"]}]})"), "items[0].ids[0]");
  expect_error(with_request("flag.json", R"({"items": [{"text": "a", "add_special_tokens": "yes"}]})"),
               "add_special_tokens");

  auto help = run("tokenize --help");
  CHECK(help.exit_code == 0);
  CHECK(help.out.find("raise_exception") != std::string::npos);
  fs::remove_all(tmp);
}
