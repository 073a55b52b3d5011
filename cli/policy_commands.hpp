#pragma once

// `moert solve`, `moert simulate` and `moert calibrate`: the FinDEP policy layer from the command
// line. File I/O lives here; policy/ only sees JSON text and values.

#include "commands.hpp"
#include "core/error.hpp"
#include "policy/model_shape.hpp"
#include "policy/perf_model.hpp"

#include <string>

namespace moert::cli {

command_runner add_solve_command(CLI::App& app);
command_runner add_simulate_command(CLI::App& app);
command_runner add_calibrate_command(CLI::App& app);

// A model shape by file path, or by name from configs/models/shapes/<name>.json (looked up under
// ./configs, then the source tree's configs/).
[[nodiscard]] result<policy::model_shape> load_model_shape(const std::string& name_or_path);
// A testbed by file path, or by name from configs/testbeds/<name>.json.
[[nodiscard]] result<policy::testbed> load_testbed(const std::string& name_or_path);

}  // namespace moert::cli
