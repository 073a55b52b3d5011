#include "engine_options.hpp"

#include "actors/runtime.hpp"
#include "transport/handshake.hpp"

#include "model_source.hpp"
#include "policy_commands.hpp"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>

namespace moert::cli {

void add_engine_options(CLI::App& app, engine_options& opt) {
  app.add_option("--backend", opt.backend, "Compute backend of every device: cpu or cuda (needs a CUDA build and a GPU)");
  app.add_option("--ag", opt.ag, "Attention devices (shards); without --ag, --eg and --threads the placement comes from the calibrated cpu testbed")->check(CLI::Range(1, 256));
  app.add_option("--eg", opt.eg, "Expert devices")->check(CLI::Range(1, 256));
  app.add_option("--threads", opt.threads, "Compute threads per device (with --reference: of the forward, default 1)")->check(CLI::Range(1, 256));
  app.add_option("--r1", opt.r1, "Micro-batches per step")->check(CLI::Range(1, 1024));
  app.add_option("--m-a", opt.m_a, "Sequences per micro-batch (0: batch / r1)");
  app.add_option("--r2", opt.r2, "A2E chunks per micro-batch")->check(CLI::Range(1, 1024));
  app.add_option("--order", opt.order, "AASS, ASAS or PPPipe");
  app.add_option("--scheduler", opt.scheduler, "μ-queue scheduler: defrag, mtfs or flfs");
  app.add_option("--max-wait-ms", opt.max_wait_ms, "Latency guard of the μ-queues (0: off)")
      ->check(CLI::Range(0.0, 1e6));
  app.add_option("--online", opt.online_testbed,
                 "Re-solve the FinDEP plan online with this testbed (e.g. cpu, or a JSON path)");
  app.add_option("--gemm-testbed", opt.gemm_testbed,
                 "Testbed JSON written by `moert calibrate --backend cuda`: its expert_gemm crossover sets the cuda "
                 "devices' grouped/dense switch (without it: the uncalibrated default, said in the report)");
  app.add_option("--trace", opt.trace_file, "Write a Chrome/Perfetto trace (JSON)");
  app.add_flag("--reference", opt.reference, "Run the bare reference forward, without actors");
  app.add_option("--cluster", opt.cluster_file,
                 "Cluster file: shards and experts run on `moert node` processes (overrides --ag/--eg)");
  app.add_option("--secret-file", opt.secret_file, "The cluster's shared secret (mode 0600)");
  app.add_option("--tls-cert", opt.tls.cert_file, "Cluster over TLS: this process's certificate (PEM)");
  app.add_option("--tls-key", opt.tls.key_file, "Cluster over TLS: its private key (PEM)");
  app.add_option("--tls-ca", opt.tls.ca_file, "Cluster over TLS: the CA that signed every node's certificate");
  app.add_option("--faults", opt.faults_file,
                 "Fault plan (JSON): seeded drop/duplicate/reorder/delay of A2E/E2A, kills, slow devices");
  app.add_option("--faults-report", opt.faults_report_file, "With --faults: write what was injected, as JSON");
}

result<gpu::backend_kind> parse_backend(const std::string& name) {
  if (auto kind = gpu::parse_backend_kind(name))
    return *kind;
  return make_error(error_code::invalid_argument, "--backend '" + name + "': expected cpu or cuda");
}

result<policy::expert_gemm_crossover> load_gemm_crossover(const std::string& testbed_file) {
  auto bed = load_testbed(testbed_file);
  if (!bed)
    return bed.err();
  if (!bed->expert_gemm)
    return make_error(error_code::invalid_argument, "--gemm-testbed " + testbed_file +
                                                        ": has no \"expert_gemm\" (write it with `moert calibrate "
                                                        "--backend cuda`)");
  return *bed->expert_gemm;
}

result<gpu::backend_kind> reference_backend(const engine_options& opt) {
  auto backend = parse_backend(opt.backend);
  if (!backend)
    return backend.err();
  if (auto usable = actors::check_backend(*backend); !usable.ok())
    return usable.err();
  return *backend;
}

result<EngineConfig> make_engine_config(const engine_options& opt, const std::string& model_dir,
                                        std::uint64_t weight_seed) {
  EngineConfig config;
  config.model_dir = model_dir;
  if (model_dir.empty())
    config.synthetic_config = default_model_json();
  config.weight_seed = weight_seed;
  config.attention_devices = std::max<std::size_t>(1, opt.ag);
  config.expert_devices = std::max<std::size_t>(1, opt.eg);
  config.threads_per_device = std::max<std::size_t>(1, opt.threads);
  if (opt.ag == 0 && opt.eg == 0 && opt.threads == 0 && opt.cluster_file.empty() && opt.faults_file.empty()) {
    // No placement asked for: the one the solver predicts fastest on this machine. (A fault
    // plan names attention and expert devices: it keeps 1 + 1 unless placed.)
    auto bed = load_testbed("cpu");
    if (bed)
      config.placement_testbed = *bed;
    else
      std::fprintf(stderr, "moert: warning: no calibrated cpu testbed (%s): the engine runs on 1 attention + 1 "
                   "expert device\n", bed.err().what().c_str());
  }
  auto backend = parse_backend(opt.backend);
  if (!backend)
    return backend.err();
  config.backend = *backend;
  // Here, before a checkpoint is read or a port bound: the reason it cannot run, if it cannot.
  if (auto usable = actors::check_backend(*backend); !usable.ok())
    return usable.err();
  auto order = policy::parse_segment_order(opt.order);
  if (!order)
    return make_error(error_code::invalid_argument, "--order '" + opt.order + "': expected AASS, ASAS or PPPipe");
  auto scheduler = policy::parse_queue_policy(opt.scheduler);
  if (!scheduler)
    return make_error(error_code::invalid_argument,
                      "--scheduler '" + opt.scheduler + "': expected defrag, mtfs or flfs");
  config.plan = {opt.r1, opt.m_a, opt.r2, *order};
  config.scheduler = *scheduler;
  config.defrag.max_wait = std::chrono::nanoseconds(std::int64_t(opt.max_wait_ms * 1e6));
  config.trace = !opt.trace_file.empty();
  if (!opt.faults_file.empty()) {
    auto plan = load_fault_plan(opt.faults_file);
    if (!plan.ok())
      return plan.err();
    config.faults = std::move(*plan);
  } else if (!opt.faults_report_file.empty()) {
    return make_error(error_code::invalid_argument, "--faults-report needs --faults FILE");
  }
  if (!opt.online_testbed.empty()) {
    auto bed = load_testbed(opt.online_testbed);
    if (!bed)
      return bed.err();
    config.online_testbed = *bed;
  }
  if (!opt.gemm_testbed.empty()) {
    auto crossover = load_gemm_crossover(opt.gemm_testbed);
    if (!crossover)
      return crossover.err();
    config.expert_gemm = std::move(*crossover);
  }
  if (!opt.cluster_file.empty()) {
    auto cluster = load_cluster_config(opt.cluster_file);
    if (!cluster.ok())
      return cluster.err();
    config.cluster = std::move(*cluster);
    config.attention_devices = config.cluster->attention_devices();
    config.expert_devices = config.cluster->expert_devices();
    if (!opt.secret_file.empty()) {
      auto secret = transport::load_secret(opt.secret_file);
      if (!secret.ok())
        return secret.err();
      config.cluster_secret = std::move(*secret);
    }
    config.tls = opt.tls;
  } else if (!opt.secret_file.empty() || !opt.tls.cert_file.empty()) {
    return make_error(error_code::invalid_argument, "--secret-file and --tls-* are for --cluster");
  }
  return config;
}

std::size_t reference_threads(const engine_options& opt) {
  return std::max<std::size_t>(1, opt.threads);
}

std::string placement_text(const engine_options& opt) {
  std::size_t ag = std::max<std::size_t>(1, opt.ag), eg = std::max<std::size_t>(1, opt.eg);
  std::string where;
  if (!opt.cluster_file.empty()) {
    auto cluster = load_cluster_config(opt.cluster_file);
    if (cluster.ok()) {
      ag = cluster->attention_devices();
      eg = cluster->expert_devices();
      where = " on " + std::to_string(cluster->nodes.size()) + " nodes of " + opt.cluster_file + " (" +
              to_string(cluster->transport) + ")";
    }
  }
  return std::to_string(ag) + " attention + " + std::to_string(eg) + " expert devices" + where;
}

void print_report(const EngineReport& report) {
  if (report.devices.empty()) {
    // A cluster: devices, batches and messages are counted in the nodes' processes.
    std::printf("cluster: %.0f bytes through the gates, %.0f bytes in %.0f UCX messages; per-device figures "
                "stay in the nodes\n",
                double(report.cluster_caf_bytes), double(report.cluster_ucx_bytes), double(report.cluster_ucx_messages));
    return;
  }
  std::printf("devices:");
  for (std::size_t i = 0; i < report.devices.size(); ++i)
    std::printf("%s %s %.1f %% busy", i ? "," : "", report.devices[i].name.c_str(),
                100.0 * report.devices[i].busy_fraction);
  std::printf("\nexpert batch: mean %.1f, p50 %.0f, p95 %.0f tokens; %.2f executions per (layer, wave); "
              "%.1f messages per token\n",
              report.expert_batch_mean, report.expert_batch_p50, report.expert_batch_p95,
              report.executions_per_layer_wave, report.messages_per_token);
  // Off the cpu backend: each device's backend and own weights, and the expert GEMM switch.
  if (!report.expert_gemm_switch.empty()) {
    std::printf("backends:");
    for (std::size_t i = 0; i < report.devices.size(); ++i)
      std::printf("%s %s on %s (%.1f MiB of weights)", i ? "," : "", report.devices[i].name.c_str(),
                  report.devices[i].backend.c_str(), double(report.devices[i].weight_bytes) / double(1 << 20));
    std::printf("\nexpert GEMM switch: %s\n", report.expert_gemm_switch.c_str());
  }
}

std::string faults_json(const EngineReport& report) {
  const transport::fault_counts& c = report.faults;
  nlohmann::json out = {
      {"messages", c.messages},           {"injected", c.injected()},
      {"dropped", c.dropped},             {"duplicated", c.duplicated},
      {"reordered", c.reordered},         {"delayed", c.delayed},
      {"killed", c.killed},               {"slowed_tasks", c.slowed_tasks},
      {"retransmitted", c.retransmitted}, {"ignored_e2a", c.ignored_e2a},
      {"failed_micro_batches", c.failed_batches},
      {"requests_ended_length", report.finished_length}, {"requests_ended_stop", report.finished_stop},
      {"requests_ended_error", report.errors}};
  return out.dump();
}

status report_faults(const EngineReport& report, const engine_options& opt) {
  if (opt.faults_file.empty() || !report.faults_enabled)
    return {};
  const transport::fault_counts& c = report.faults;
  std::printf("faults injected (%s): %llu of %llu A2E/E2A messages: %llu dropped, %llu duplicated, %llu reordered, "
              "%llu delayed; %llu actors killed; %llu device tasks slowed; recovery: %llu A2E retransmitted, %llu E2A "
              "entries ignored (duplicate or late), %llu micro-batches failed\n",
              opt.faults_file.c_str(), (unsigned long long)(c.dropped + c.duplicated + c.reordered + c.delayed),
              (unsigned long long)c.messages, (unsigned long long)c.dropped, (unsigned long long)c.duplicated,
              (unsigned long long)c.reordered, (unsigned long long)c.delayed, (unsigned long long)c.killed,
              (unsigned long long)c.slowed_tasks, (unsigned long long)c.retransmitted,
              (unsigned long long)c.ignored_e2a, (unsigned long long)c.failed_batches);
  if (opt.faults_report_file.empty())
    return {};
  std::ofstream out{opt.faults_report_file};
  out << faults_json(report) << "\n";
  if (!out.flush())
    return make_error(error_code::io_error, "cannot write faults report '" + opt.faults_report_file + "'");
  return {};
}

status write_trace_file(const Engine& engine, const std::string& path) {
  std::ofstream out{path};
  out << engine.trace_json();
  if (!out.flush())
    return make_error(error_code::io_error, "cannot write trace '" + path + "'");
  return {};
}

status write_trace(const Engine& engine, const engine_options& opt) {
  if (opt.trace_file.empty())
    return {};
  MOERT_TRY(write_trace_file(engine, opt.trace_file));
  std::printf("trace: %s (open in ui.perfetto.dev or chrome://tracing)\n", opt.trace_file.c_str());
  return {};
}

}  // namespace moert::cli
