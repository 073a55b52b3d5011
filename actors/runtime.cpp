#include "actors/runtime.hpp"

#include "actors/device.hpp"
#include "model/safetensors.hpp"

#include <algorithm>
#include <bit>
#include <set>

namespace moert::actors {

// -- expert_placement ------------------------------------------------------------------------

expert_placement::expert_placement(std::size_t num_experts, std::size_t num_devices)
    : num_experts_(num_experts), device_(std::make_unique<std::atomic<std::uint32_t>[]>(num_experts)) {
  for (std::size_t e = 0; e < num_experts; ++e)
    device_[e].store(std::uint32_t(e % std::max<std::size_t>(num_devices, 1)));
}

std::vector<std::uint32_t> expert_placement::experts_on(std::size_t device) const {
  std::vector<std::uint32_t> out;
  for (std::size_t e = 0; e < num_experts_; ++e)
    if (device_of(e) == device)
      out.push_back(std::uint32_t(e));
  return out;
}

std::vector<std::uint32_t> runtime_context::hosted_by(std::size_t device) const {
  if (placement)
    return placement->experts_on(device);
  std::vector<std::uint32_t> out;
  for (std::size_t e = 0; e < std::size_t(config.num_experts); ++e)
    if (e % num_expert_devices == device)
      out.push_back(std::uint32_t(e));
  return out;
}

// -- size_histogram ------------------------------------------------------------------------

std::size_t size_histogram::bucket_of(std::size_t value) {
  if (value < exact_limit)
    return value;
  // value in [2^e, 2^(e+1)), e >= 10: 64 equal sub-buckets of that octave.
  std::size_t e = std::size_t(std::bit_width(value)) - 1;
  std::size_t sub = (value - (std::size_t{1} << e)) >> (e - 6);
  std::size_t octave = e - 10;
  return std::min(num_buckets() - 1, exact_limit + octave * sub_buckets + sub);
}

std::size_t size_histogram::lower_bound_of(std::size_t bucket) {
  if (bucket < exact_limit)
    return bucket;
  std::size_t octave = (bucket - exact_limit) / sub_buckets, sub = (bucket - exact_limit) % sub_buckets;
  std::size_t e = octave + 10;
  return (std::size_t{1} << e) + (sub << (e - 6));
}

void size_histogram::add(std::size_t value) {
  ++buckets_[bucket_of(value)];
  ++count_;
  sum_ += (long double)value;
}

double size_histogram::at_rank(std::uint64_t rank) const {
  std::uint64_t seen = 0;
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    seen += buckets_[b];
    if (seen > rank)
      return double(lower_bound_of(b));
  }
  return 0.0;
}

// -- runtime_stats ---------------------------------------------------------------------------

namespace {
// Steps remembered per (layer, shard). A shard runs one step at a time, but batches of an
// earlier step may still be recorded by a slower expert device while the next step's first
// batches are: a few steps of memory cover that.
constexpr std::size_t remembered_steps = 8;
}  // namespace

void runtime_stats::record_expert_batch(std::uint32_t layer, std::size_t tokens,
                                        const std::vector<std::tuple<std::uint32_t, std::uint64_t>>& waves) {
  std::lock_guard<std::mutex> guard{mutex_};
  batch_sizes_.add(tokens);
  std::set<std::tuple<std::uint32_t, std::uint64_t>> distinct(waves.begin(), waves.end());
  for (const auto& [shard, step] : distinct) {
    ++executions_;
    std::vector<std::uint64_t>& steps = recent_[{layer, shard}];
    if (std::find(steps.begin(), steps.end(), step) != steps.end())
      continue;
    ++waves_;
    steps.push_back(step);
    if (steps.size() > remembered_steps)
      steps.erase(std::min_element(steps.begin(), steps.end()));
  }
}

void runtime_stats::record_replan(double solve_micros) {
  std::lock_guard<std::mutex> guard{mutex_};
  ++replans_;
  last_solve_micros_ = solve_micros;
}

double runtime_stats::last_solve_micros() const {
  std::lock_guard<std::mutex> guard{mutex_};
  return last_solve_micros_;
}

runtime_stats::batch_summary runtime_stats::expert_batches() const {
  std::lock_guard<std::mutex> guard{mutex_};
  batch_summary out;
  out.count = batch_sizes_.count();
  if (out.count == 0)
    return out;
  out.mean = batch_sizes_.mean();
  out.p50 = batch_sizes_.at_rank(out.count / 2);
  out.p95 = batch_sizes_.at_rank(std::min(out.count - 1, out.count * 95 / 100));
  return out;
}

double runtime_stats::executions_per_layer_wave() const {
  std::lock_guard<std::mutex> guard{mutex_};
  return waves_ ? double(executions_) / double(waves_) : 0.0;
}

std::size_t runtime_stats::remembered_waves() const {
  std::lock_guard<std::mutex> guard{mutex_};
  std::size_t n = 0;
  for (const auto& [key, steps] : recent_)
    n += steps.size();
  return n;
}

// -- backends ----------------------------------------------------------------------------

status check_backend(gpu::backend_kind kind) {
  for (const gpu::backend_info& info : gpu::compiled_backends()) {
    if (info.kind != kind)
      continue;
    if (info.usable)
      return status::success();
    return make_error(error_code::device_error, std::string("backend '") + gpu::to_string(kind) + "' cannot run here: " +
                                                    (info.reason.empty() ? "no device present" : info.reason));
  }
  return make_error(error_code::unsupported,
                    std::string("backend '") + gpu::to_string(kind) +
                        "' is not compiled into this build (configure with -DMOERT_WITH_CUDA=ON where nvcc 13, "
                        "cuBLAS and NCCL are installed)");
}

gpu::gemm_calibration gemm_calibration_from(const std::optional<policy::expert_gemm_crossover>& crossover) {
  gpu::gemm_calibration out;
  if (crossover) {
    out.calibrated = true;
    out.dense_min_rows = crossover->dense_min_rows;
    out.source = crossover->source;
  }
  return out;
}

result<std::unique_ptr<gpu::backend>> make_device_backend(gpu::backend_kind kind, std::size_t device_index,
                                                          std::size_t num_threads,
                                                          const gpu::gemm_calibration& expert_gemm) {
  if (auto usable = check_backend(kind); !usable.ok())
    return usable.err();
  gpu::backend_options options;
  options.num_threads = num_threads;
  options.expert_gemm = expert_gemm;
  if (kind == gpu::backend_kind::cuda) {
    std::size_t gpus = 0;
    for (const gpu::backend_info& info : gpu::compiled_backends())
      if (info.kind == kind)
        gpus = info.num_devices;
    options.device_index = gpus > 0 ? device_index % gpus : 0;
  }
  return gpu::create_backend(kind, options);
}

result<std::unique_ptr<device>> make_device_with_weights(const std::string& name, gpu::backend_kind kind,
                                                         std::size_t device_index, std::size_t num_threads,
                                                         const gpu::gemm_calibration& expert_gemm,
                                                         const model::model_config& config,
                                                         const model::checkpoint* checkpoint,
                                                         std::uint64_t weight_seed, const model::load_options& part,
                                                         trace_recorder* trace) {
  auto backend = make_device_backend(kind, device_index, num_threads, expert_gemm);
  if (!backend)
    return make_error(backend.err().code, name + ": " + backend.err().message);
  auto dev = std::make_unique<device>(name, std::move(*backend), trace);
  result<model::model_weights> w = checkpoint ? model::load_weights(config, *checkpoint, part, dev->backend())
                                              : model::synthetic_weights(config, weight_seed, dev->backend(), part);
  if (!w)
    return make_error(w.err().code,
                      "loading the weights of " + name + " on " + dev->backend().name() + ": " + w.err().message);
  dev->set_weights(std::make_shared<const model::model_weights>(std::move(*w)));
  return dev;
}

}  // namespace moert::actors
