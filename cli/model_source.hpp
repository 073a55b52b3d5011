#pragma once

// Where the CLI's model comes from: a Hugging Face checkpoint directory, or the embedded
// synthetic default (configs/models/default-moe.json with seeded random weights).

#include "core/error.hpp"
#include "gpu/registry.hpp"
#include "model/forward.hpp"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moert::cli {

// configs/models/default-moe.json, compiled in.
const char* default_model_json();

struct loaded_model {
  // Where the weights live when not on the host (a cuda backend); declared first so that it
  // outlives the model that reads them.
  std::unique_ptr<gpu::backend> weights_backend;
  std::unique_ptr<model::reference_model> model;
  std::string description;  // "checkpoint DIR" or "embedded default (seed S)"
  std::vector<std::string> unexpected_tensors;
};

// `model_dir` empty = the embedded default with weights from `weight_seed`. On the cpu backend
// with `num_threads`; on cuda the weights, the KV cache and every operation are on GPU 0.
result<loaded_model> load_model(const std::string& model_dir, std::uint64_t weight_seed,
                                std::size_t num_threads, gpu::backend_kind backend = gpu::backend_kind::cpu);

// Reads a prompts file: a JSON list of non-empty lists of token ids in [0, vocab_size).
result<std::vector<std::vector<std::int32_t>>> load_prompts(const std::string& path,
                                                            std::int64_t vocab_size);

}  // namespace moert::cli
