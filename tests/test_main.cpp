// The shared Catch2 main. A test binary that needs ../shared/fixtures and finds it absent
// exits 77 (see moert_add_test) so ctest reports it as skipped, never as passed.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "test_support.hpp"

#include <cstdio>

namespace moert::test {

bool skip_requested = false;
std::string skip_reason;

void skip_whole_binary(const std::string& reason) {
  skip_requested = true;
  skip_reason = reason;
}

}  // namespace moert::test

int main(int argc, char** argv) {
  int rc = Catch::Session().run(argc, argv);
  if (rc == 0 && moert::test::skip_requested) {
    std::printf("SKIPPED: %s\n", moert::test::skip_reason.c_str());
    return 77;
  }
  return rc;
}
