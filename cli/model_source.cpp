#include "model_source.hpp"

#include <nlohmann/json.hpp>

#include <fstream>
#include <sstream>

namespace moert::cli {

result<loaded_model> load_model(const std::string& model_dir, std::uint64_t weight_seed,
                                std::size_t num_threads, gpu::backend_kind backend) {
  loaded_model out;
  if (backend != gpu::backend_kind::cpu) {
    // Weights uploaded through one backend of the device, the forward run by another that
    // shares its memory (the same GPU), as the seam's memory rules ask.
    auto home = gpu::create_backend(backend);
    if (!home)
      return home.err();
    auto runner = gpu::create_backend(backend);
    if (!runner)
      return runner.err();
    out.weights_backend = std::move(*home);
    if (model_dir.empty()) {
      auto config = model::parse_config(default_model_json(), "embedded default model");
      if (!config)
        return config.err();
      auto weights = std::make_shared<const model::model_weights>(
          model::synthetic_weights(*config, weight_seed, *out.weights_backend));
      out.model = std::make_unique<model::reference_model>(*config, std::move(weights), std::move(*runner));
      out.description = "embedded default (configs/models/default-moe.json, weight seed " +
                        std::to_string(weight_seed) + ")";
      return out;
    }
    auto loaded = model::load_checkpoint(model_dir, {}, *out.weights_backend);
    if (!loaded)
      return loaded.err();
    out.unexpected_tensors = loaded->weights.unexpected_tensors;
    auto weights = std::make_shared<const model::model_weights>(std::move(loaded->weights));
    out.model = std::make_unique<model::reference_model>(std::move(loaded->config), std::move(weights),
                                                         std::move(*runner));
    out.description = "checkpoint " + model_dir;
    return out;
  }
  if (model_dir.empty()) {
    auto config = model::parse_config(default_model_json(), "embedded default model");
    if (!config)
      return config.err();
    auto weights = model::synthetic_weights(*config, weight_seed);
    out.model = std::make_unique<model::reference_model>(*config, std::move(weights), num_threads);
    out.description = "embedded default (configs/models/default-moe.json, weight seed " +
                      std::to_string(weight_seed) + ")";
    return out;
  }
  auto loaded = model::load_checkpoint(model_dir);
  if (!loaded)
    return loaded.err();
  out.unexpected_tensors = loaded->weights.unexpected_tensors;
  out.model = std::make_unique<model::reference_model>(std::move(loaded->config), std::move(loaded->weights),
                                                       num_threads);
  out.description = "checkpoint " + model_dir;
  return out;
}

result<std::vector<std::vector<std::int32_t>>> load_prompts(const std::string& path,
                                                            std::int64_t vocab_size) {
  std::ifstream in{path};
  if (!in)
    return make_error(error_code::io_error, "cannot open prompts file '" + path + "'");
  std::stringstream text;
  text << in.rdbuf();
  auto root = nlohmann::json::parse(text.str(), nullptr, false);
  auto invalid = [&](const std::string& message) {
    return make_error(error_code::invalid_argument, path + ": " + message);
  };
  if (root.is_discarded())
    return invalid("not valid JSON");
  if (!root.is_array() || root.empty())
    return invalid("expected a non-empty list of prompts (lists of token ids)");
  std::vector<std::vector<std::int32_t>> prompts;
  for (std::size_t p = 0; p < root.size(); ++p) {
    const auto& prompt = root[p];
    if (!prompt.is_array())
      return invalid("prompt " + std::to_string(p) + " is not a list of token ids");
    if (prompt.empty())
      return invalid("prompt " + std::to_string(p) + " is empty");
    std::vector<std::int32_t> ids;
    for (std::size_t i = 0; i < prompt.size(); ++i) {
      const auto& id = prompt[i];
      if (!id.is_number_integer())
        return invalid("prompt " + std::to_string(p) + ", position " + std::to_string(i) +
                       ": " + id.dump() + " is not an integer token id");
      auto value = id.get<std::int64_t>();
      if (value < 0 || value >= vocab_size)
        return invalid("prompt " + std::to_string(p) + ", position " + std::to_string(i) +
                       ": token id " + std::to_string(value) + " is outside the vocabulary [0, " +
                       std::to_string(vocab_size) + ")");
      ids.push_back(std::int32_t(value));
    }
    prompts.push_back(std::move(ids));
  }
  return prompts;
}

}  // namespace moert::cli
