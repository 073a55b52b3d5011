#include "model/kv_cache.hpp"

namespace moert::model {

kv_cache::kv_cache(const model_config& config)
    : row_floats_(std::size_t(config.kv_dim())),
      keys_(std::size_t(config.num_layers)),
      values_(std::size_t(config.num_layers)) {}

std::size_t kv_cache::num_bytes() const {
  return 2 * keys_.size() * length_ * row_floats_ * sizeof(float);
}

void kv_cache::grow(std::size_t num_new) {
  std::size_t floats = (length_ + num_new) * row_floats_;
  for (std::size_t l = 0; l < keys_.size(); ++l) {
    keys_[l].resize(floats);
    values_[l].resize(floats);
  }
}

}  // namespace moert::model
