#pragma once

// `moert bench`: the runtime against the bare reference forward on a mid-size synthetic MoE,
// and the overlap that FinDEP plans reach on one attention core + one expert core.

#include "commands.hpp"

namespace moert::cli {

command_runner add_bench_command(CLI::App& app);

}  // namespace moert::cli
