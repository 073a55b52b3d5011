#pragma once

// One sequence's cached keys and values, per layer, for positions [0, length()).
//
// Layout per token and layer (model_config::kv_floats_per_token_per_layer):
// - grouped-query attention: a key row and a value row of kv_dim floats each;
// - MLA (deepseek_v2): one compressed row in keys(), the kv latent after kv_a_layernorm
//   (kv_lora_rank floats, normalised once when written) followed by the roped k_pe
//   (qk_rope_head_dim); there is no values() array (null). Attention reads it through the
//   absorbed kv_b_proj, never expanded per head.
//
// Storage: per layer, one buffer of the backend the cache was made on (device memory on a
// GPU; the rows never move to the host), grown by doubling. keys()/values() point into it.
//
// Ownership: owned by whoever owns the sequence (the reference forward's caller, or the
// attention shard the request is pinned to); copying copies the rows on the same backend.
// Not thread-safe; a forward pass writes rows [length(), length() + n) of every layer after
// grow(n) and then calls advance(n). grow() may move the rows (pointers taken before it are
// stale).

#include "gpu/backend.hpp"
#include "gpu/registry.hpp"
#include "model/config.hpp"

#include <cstddef>
#include <vector>

namespace moert::model {

class kv_cache {
public:
  explicit kv_cache(const model_config& config, gpu::backend& backend = gpu::host_backend());
  kv_cache(const kv_cache& other);
  kv_cache& operator=(const kv_cache& other);
  kv_cache(kv_cache&&) noexcept = default;
  kv_cache& operator=(kv_cache&&) noexcept = default;

  // The backend whose memory holds the rows.
  gpu::backend& backend() const { return *backend_; }
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

  // Backend memory, null before the first grow() (and values() always for MLA).
  float* keys(std::size_t layer) { return keys_[layer].floats(); }
  float* values(std::size_t layer) { return values_[layer].floats(); }
  const float* keys(std::size_t layer) const { return keys_[layer].floats(); }
  const float* values(std::size_t layer) const { return values_[layer].floats(); }

private:
  gpu::backend* backend_;
  std::size_t row_floats_;
  bool split_values_;
  std::vector<gpu::buffer> keys_;    // per layer: capacity_ × row_floats
  std::vector<gpu::buffer> values_;  // per layer: capacity_ × row_floats; empty for MLA
  std::size_t capacity_ = 0;         // positions allocated
  std::size_t length_ = 0;
};

}  // namespace moert::model
