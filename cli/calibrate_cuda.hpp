#pragma once

// `moert calibrate --backend cuda`: the testbed of one GPU (configs/testbeds/*.json), measured
// through the CUDA backend: the α-β lines of a dense GEMM, attention and a device copy (the
// in-process transport, as the cpu calibration's memcpy), and the grouped vs dense crossover
// of a device's expert GEMMs (EPS-MoE) that the CUDA backend switches on. Compiled only with
// CUDA (MOERT_HAVE_CUDA); without a GPU it fails with the CUDA runtime's reason.

#include <cstddef>
#include <string>

namespace moert::cli {

struct cuda_calibrate_options {
  std::string out;   // testbed JSON to write; empty: print it
  std::string name;  // testbed name; default: the file's stem, or the GPU's name
  int device = 0;
  // The expert shape of the crossover sweep: gate_up (2·intermediate × hidden) and down
  // (hidden × intermediate) for `experts` experts on the device. Default: the bench model's
  // (../shared/peers/make_bench_checkpoint.py: hidden 1024, expert FFN 512, 32 experts).
  std::size_t hidden = 1024, expert_intermediate = 512, experts = 32;
  std::string dtype = "bf16";  // bf16 or f32 weights
  std::size_t warmup = 10, trials = 20;
};

int run_calibrate_cuda(const cuda_calibrate_options& opt);

}  // namespace moert::cli
