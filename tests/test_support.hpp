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
