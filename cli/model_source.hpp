#pragma once

// Where the CLI's model comes from: a Hugging Face checkpoint directory, or the embedded
// synthetic default (configs/models/default-moe.json with seeded random weights).

#include "core/error.hpp"
#include "model/forward.hpp"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moert::cli {

// configs/models/default-moe.json, compiled in.
const char* default_model_json();

struct loaded_model {
  std::unique_ptr<model::reference_model> model;
  std::string description;  // "checkpoint DIR" or "embedded default (seed S)"
  std::vector<std::string> unexpected_tensors;
};

// `model_dir` empty = the embedded default with weights from `weight_seed`.
result<loaded_model> load_model(const std::string& model_dir, std::uint64_t weight_seed,
                                std::size_t num_threads);

// Reads a prompts file: a JSON list of non-empty lists of token ids in [0, vocab_size).
result<std::vector<std::vector<std::int32_t>>> load_prompts(const std::string& path,
                                                            std::int64_t vocab_size);

}  // namespace moert::cli
