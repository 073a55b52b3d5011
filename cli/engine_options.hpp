#pragma once

// Command-line options that place and schedule an Engine (`--backend`, `--ag`, `--eg`, plan
// and scheduler flags), shared by `moert generate`, `eval`, `serve` and `bench`.

#include "engine/engine.hpp"

#include <CLI/CLI.hpp>

#include <string>

namespace moert::cli {

struct engine_options {
  // 0: not given. With none of the three given (and no cluster) the engine's placement comes
  // from the calibrated cpu testbed (EngineConfig::placement_testbed; not with --faults, whose
  // plan names attention and expert devices); with any of them given,
  // exactly that placement, 1 for the others.
  std::size_t ag = 0;
  std::size_t eg = 0;
  std::size_t threads = 0;  // per device; with --reference: the forward's threads (default 1)
  std::string backend = "cpu";  // cpu or cuda (EngineConfig::backend)
  std::size_t r1 = 1;
  std::size_t m_a = 0;
  std::size_t r2 = 1;
  std::string order = "ASAS";
  std::string scheduler = "defrag";
  double max_wait_ms = 100.0;
  std::string online_testbed;  // re-solve the plan online with this testbed (name or path)
  std::string gemm_testbed;    // its "expert_gemm" (moert calibrate --backend cuda) sets cuda's switch
  std::string trace_file;
  bool reference = false;  // bypass the actors: the bare single-process forward
  std::string cluster_file;  // run on `moert node` processes (configs/clusters/README.md)
  std::string secret_file;   // the cluster's shared secret
  cluster_tls tls;           // or TLS with certificates
  std::string faults_file;         // a fault plan (engine/fault_plan.hpp)
  std::string faults_report_file;  // what the injector did, as JSON
};

void add_engine_options(CLI::App& app, engine_options& opt);

// "cpu" or "cuda"; anything else is an error naming the value.
result<gpu::backend_kind> parse_backend(const std::string& name);

// The "expert_gemm" crossover of a testbed file (`--gemm-testbed`), or an error naming the file
// when it has none.
result<policy::expert_gemm_crossover> load_gemm_crossover(const std::string& testbed_file);

// With --reference: the backend the bare forward runs on, or the error naming why it cannot
// run here.
result<gpu::backend_kind> reference_backend(const engine_options& opt);

// --threads, or 1 when not given: the reference forward's threads.
std::size_t reference_threads(const engine_options& opt);

// Fills placement, plan and scheduler of `config` from the options.
result<EngineConfig> make_engine_config(const engine_options& opt, const std::string& model_dir,
                                        std::uint64_t weight_seed);

// "1 attention + 2 expert devices", or for a cluster "… on 3 nodes of FILE (ucx-tcp)".
std::string placement_text(const engine_options& opt);

// "attention 0 busy 41.2 %, …" and the batch/fragmentation/message figures, to stdout.
void print_report(const EngineReport& report);

// The engine's trace (Chrome trace JSON) to `path`; an io_error naming it when it cannot be written.
status write_trace_file(const Engine& engine, const std::string& path);
// Writes the engine's trace to opt.trace_file when set, and says where.
status write_trace(const Engine& engine, const engine_options& opt);

// With --faults: "faults injected: …" to stdout, and the JSON to opt.faults_report_file.
status report_faults(const EngineReport& report, const engine_options& opt);
// The fault figures of a report as a JSON object.
std::string faults_json(const EngineReport& report);

}  // namespace moert::cli
