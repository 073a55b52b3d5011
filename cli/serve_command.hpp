#pragma once

// `moert serve`: the OpenAI-compatible HTTP server (server/) in front of an Engine, with the
// engine's placement and plan flags. Listens first (/health answers 503 while the model
// loads), then loads; SIGINT/SIGTERM end open streams and shut down cleanly.

#include "commands.hpp"

namespace moert::cli {

command_runner add_serve_command(CLI::App& app);

}  // namespace moert::cli
