#include "model/kv_cache.hpp"

namespace moert::model {

kv_cache::kv_cache(const model_config& config)
    : row_floats_(std::size_t(config.mla() ? config.kv_floats_per_token_per_layer() : config.kv_dim())),
      split_values_(!config.mla()),
      keys_(std::size_t(config.num_layers)),
      values_(std::size_t(config.num_layers)) {}

void kv_cache::grow(std::size_t num_new) {
  std::size_t floats = (length_ + num_new) * row_floats_;
  for (std::size_t l = 0; l < keys_.size(); ++l) {
    keys_[l].resize(floats);
    if (split_values_)
      values_[l].resize(floats);
  }
}

}  // namespace moert::model
