#pragma once

// `moert solve`, `moert simulate` and `moert calibrate`: the FinDEP policy layer from the command
// line. File I/O lives here; policy/ only sees JSON text and values.

#include "commands.hpp"
#include "core/error.hpp"
#include "policy/model_shape.hpp"
#include "policy/perf_model.hpp"

#include <string>
#include <vector>

namespace moert::cli {

command_runner add_solve_command(CLI::App& app);
command_runner add_simulate_command(CLI::App& app);
command_runner add_calibrate_command(CLI::App& app);

// A model shape by file path, or by name from configs/models/shapes/<name>.json (looked up under
// ./configs, then the source tree's configs/).
[[nodiscard]] result<policy::model_shape> load_model_shape(const std::string& name_or_path);
// A testbed by file path, or by name from configs/testbeds/<name>.json.
[[nodiscard]] result<policy::testbed> load_testbed(const std::string& name_or_path);

// Measured points of one task kind (x: its size, y: milliseconds) for the α-β fit.
struct sample_set {
  std::vector<double> x, y;
};
// The non-negative least-squares line through `samples`, printed as one line of the
// calibration report; the error names `what`.
[[nodiscard]] result<policy::linear_fit> fit_and_report(const char* what, const sample_set& samples);

}  // namespace moert::cli
