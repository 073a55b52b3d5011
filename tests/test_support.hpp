#pragma once

#include <filesystem>
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

}  // namespace moert::test
