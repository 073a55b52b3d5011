#pragma once

// One sequence's cached keys and values, per layer, for positions [0, length()).
//
// Layout per token and layer (model_config::kv_floats_per_token_per_layer):
// - grouped-query attention: a key row and a value row of kv_dim floats each;
// - MLA (deepseek_v2): one compressed row in keys(), the kv latent after kv_a_layernorm
//   (kv_lora_rank floats, normalised once when written) followed by the roped k_pe
//   (qk_rope_head_dim); there is no values() array. Attention reads it through the absorbed
//   kv_b_proj, never expanded per head.
//
// Ownership: owned by whoever owns the sequence (the reference forward's caller, or the
// attention shard the request is pinned to). Not thread-safe; a forward pass writes rows
// [length(), length() + n) of every layer after grow(n) and then calls advance(n).

#include "model/config.hpp"

#include <cstddef>
#include <vector>

namespace moert::model {

class kv_cache {
public:
  explicit kv_cache(const model_config& config);

  std::size_t length() const { return length_; }
  // Floats per row of keys() (and of values() when there is one).
  std::size_t row_floats() const { return row_floats_; }
  // Bytes held per committed token and layer: both rows, or the one compressed MLA row.
  std::size_t bytes_per_token_per_layer() const {
    return row_floats_ * (split_values_ ? 2 : 1) * sizeof(float);
  }
  // Bytes of K and V held for the committed positions.
  std::size_t num_bytes() const { return keys_.size() * length_ * bytes_per_token_per_layer(); }

  // Makes room for `num_new` more positions (not yet committed).
  void grow(std::size_t num_new);
  // Commits `num_new` positions written since grow().
  void advance(std::size_t num_new) { length_ += num_new; }

  float* keys(std::size_t layer) { return keys_[layer].data(); }
  float* values(std::size_t layer) { return values_[layer].data(); }
  const float* keys(std::size_t layer) const { return keys_[layer].data(); }
  const float* values(std::size_t layer) const { return values_[layer].data(); }

private:
  std::size_t row_floats_;
  bool split_values_;
  std::vector<std::vector<float>> keys_;    // per layer: positions × row_floats
  std::vector<std::vector<float>> values_;  // per layer: positions × row_floats; empty for MLA
  std::size_t length_ = 0;
};

}  // namespace moert::model
