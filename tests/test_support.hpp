#pragma once

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace moert::test {

// Marks the running binary as skipped: it exits 77 (ctest "Not Run") with the reason,
// unless a test failed.
void skip_whole_binary(const std::string& reason);

// The synthetic model most engine tests run (EngineConfig::synthetic_config): qwen2_moe, 3
// layers of hidden 48, 8 experts top-2, a shared (gated) expert and a dense layer (layer 1),
// so the attention-side FFN path is covered too.
inline constexpr const char* small_moe_model = R"({"model_type": "qwen2_moe", "vocab_size": 211, "hidden_size": 48,
  "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8,
  "num_experts_per_tok": 2, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40,
  "intermediate_size": 64, "mlp_only_layers": [1], "norm_topk_prob": false})";

// small_moe_model with more keys, e.g. R"("max_position_embeddings": 1024)".
inline std::string small_moe_model_with(const std::string& extra_keys) {
  std::string json = small_moe_model;
  json.insert(json.rfind('}'), ", " + extra_keys);
  return json;
}

// ../shared/fixtures/<name>, or empty when the fixtures are not checked out beside us.
inline std::filesystem::path fixture_dir(const std::string& name) {
  std::filesystem::path dir = std::filesystem::path{MOERT_FIXTURES_DIR} / name;
  return std::filesystem::exists(dir / "config.json") ? dir : std::filesystem::path{};
}

inline std::filesystem::path source_dir() {
  return MOERT_SOURCE_DIR;
}

// A file's whole content, as bytes; empty when it cannot be read.
inline std::string slurp(const std::filesystem::path& path) {
  std::ifstream in{path, std::ios::binary};
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

struct command_result {
  int exit_code;  // -1 when the command did not exit normally
  std::string out;
  std::string err;
};

// Runs `program args` through the shell, stdout and stderr captured in files of `scratch`;
// under `timeout` when `timeout_s` > 0, so a hang fails the test instead of the suite.
inline command_result run_command(const std::string& program, const std::string& args,
                                  const std::filesystem::path& scratch, int timeout_s = 0) {
  std::string cmd = (timeout_s > 0 ? "timeout " + std::to_string(timeout_s) + " " : std::string{}) + program + " " +
                    args + " >" + (scratch / "stdout").string() + " 2>" + (scratch / "stderr").string();
  int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(scratch / "stdout"), slurp(scratch / "stderr")};
}

}  // namespace moert::test
