#pragma once

// `moert node --listen HOST:PORT --secret-file F [--threads N]`: a node daemon that hosts the
// attention shards and expert devices a cluster file places on it (configs/clusters/README.md).

#include "commands.hpp"

namespace moert::cli {

command_runner add_node_command(CLI::App& app);

}  // namespace moert::cli
