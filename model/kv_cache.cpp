#include "model/kv_cache.hpp"

#include <algorithm>

namespace moert::model {

namespace {

// A copy of the first `num_bytes` of `from` in a new buffer of `capacity_bytes`.
gpu::buffer copy_of(gpu::backend& backend, const gpu::buffer& from, std::size_t num_bytes,
                    std::size_t capacity_bytes) {
  gpu::buffer out = backend.allocate(capacity_bytes);
  if (num_bytes != 0)
    backend.copy(out.data(), from.data(), num_bytes);
  return out;
}

}  // namespace

kv_cache::kv_cache(const model_config& config, gpu::backend& backend)
    : backend_(&backend),
      row_floats_(std::size_t(config.mla() ? config.kv_floats_per_token_per_layer() : config.kv_dim())),
      split_values_(!config.mla()),
      keys_(std::size_t(config.num_layers)),
      values_(std::size_t(config.num_layers)) {}

kv_cache::kv_cache(const kv_cache& other)
    : backend_(other.backend_),
      row_floats_(other.row_floats_),
      split_values_(other.split_values_),
      keys_(other.keys_.size()),
      values_(other.values_.size()),
      capacity_(other.capacity_),
      length_(other.length_) {
  std::size_t bytes = capacity_ * row_floats_ * sizeof(float);
  for (std::size_t l = 0; l < keys_.size(); ++l) {
    keys_[l] = copy_of(*backend_, other.keys_[l], bytes, bytes);
    if (split_values_)
      values_[l] = copy_of(*backend_, other.values_[l], bytes, bytes);
  }
}

kv_cache& kv_cache::operator=(const kv_cache& other) {
  if (this != &other)
    *this = kv_cache{other};
  return *this;
}

void kv_cache::grow(std::size_t num_new) {
  std::size_t needed = length_ + num_new;
  if (needed <= capacity_)
    return;
  // Doubling keeps decode's one-row growth amortised O(1) per token, as std::vector did.
  std::size_t capacity = std::max(needed, 2 * capacity_);
  std::size_t old_bytes = capacity_ * row_floats_ * sizeof(float);
  std::size_t new_bytes = capacity * row_floats_ * sizeof(float);
  for (std::size_t l = 0; l < keys_.size(); ++l) {
    keys_[l] = copy_of(*backend_, keys_[l], old_bytes, new_bytes);
    if (split_values_)
      values_[l] = copy_of(*backend_, values_[l], old_bytes, new_bytes);
  }
  capacity_ = capacity;
}

}  // namespace moert::model
