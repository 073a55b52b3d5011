#include "bench_command.hpp"
#include "commands.hpp"
#include "node_command.hpp"
#include "policy_commands.hpp"
#include "serve_command.hpp"
#include "tokenize_command.hpp"

#include <cstdio>
#include <exception>
#include <vector>

int main(int argc, char** argv) {
  CLI::App app{"moert: Mixture-of-Experts inference runtime"};
  app.require_subcommand(1);
  std::vector<std::pair<CLI::App*, moert::cli::command_runner>> commands;
  auto add = [&](auto factory) {
    std::size_t before = app.get_subcommands({}).size();
    auto runner = factory(app);
    commands.emplace_back(app.get_subcommands({})[before], std::move(runner));
  };
  add(moert::cli::add_generate_command);
  add(moert::cli::add_eval_command);
  add(moert::cli::add_inspect_command);
  add(moert::cli::add_bench_command);
  add(moert::cli::add_solve_command);
  add(moert::cli::add_simulate_command);
  add(moert::cli::add_calibrate_command);
  add(moert::cli::add_serve_command);
  add(moert::cli::add_tokenize_command);
  add(moert::cli::add_node_command);
  CLI11_PARSE(app, argc, argv);
  try {
    for (auto& [sub, run] : commands)
      if (sub->parsed())
        return run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moert: error: %s\n", e.what());
    return 1;
  }
  return 1;
}
