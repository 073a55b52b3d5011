#pragma once

// The `moert` subcommands. Each registers its options on a CLI11 app and runs when chosen;
// failures print one line "moert: error: …" to stderr and return a non-zero exit code.

#include <CLI/CLI.hpp>

#include <functional>

namespace moert::cli {

using command_runner = std::function<int()>;

command_runner add_generate_command(CLI::App& app);
command_runner add_eval_command(CLI::App& app);
command_runner add_inspect_command(CLI::App& app);

}  // namespace moert::cli
