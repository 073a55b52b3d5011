#pragma once

// One sequence's keys and values, per layer, for positions [0, length()).
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
  std::size_t row_floats() const { return row_floats_; }
  // Bytes of K and V held for the committed positions.
  std::size_t num_bytes() const;

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
  std::vector<std::vector<float>> keys_;    // per layer: positions × kv_dim
  std::vector<std::vector<float>> values_;  // per layer: positions × kv_dim
  std::size_t length_ = 0;
};

}  // namespace moert::model
