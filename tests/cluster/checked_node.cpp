// `moert node` with the cuda backend played by tests/gpu/checked_backend.hpp: the node
// command's own code (cli/node_command), but backend_kind::cuda builds checked backends, whose
// memory the host cannot read and whose every pointer is checked. This is how the cluster
// tests run cuda nodes (each device holding its own weights, rows staged to and from device
// memory) on a machine without a GPU. A violation fails the device's tasks, so the requests
// end with its message. Not for the product.

#include "gpu/checked_backend.hpp"
#include "gpu/registry.hpp"
#include "node_command.hpp"

#include <cstdio>
#include <exception>

int main(int argc, char** argv) {
  using namespace moert;
  gpu::override_backend_for_tests(gpu::backend_kind::cuda, [](const gpu::backend_options& options) {
    return result<std::unique_ptr<gpu::backend>>(
        std::make_unique<test::checked_backend>(options.num_threads, "checked " + std::to_string(options.device_index)));
  });
  CLI::App app{"moert node on checked stand-in cuda backends (tests only)"};
  app.require_subcommand(1);
  auto run = cli::add_node_command(app);
  CLI11_PARSE(app, argc, argv);
  try {
    return run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moert: error: %s\n", e.what());
    return 1;
  }
}
