#pragma once

// The single-process reference forward (no actors): the oracle every distributed path is
// compared against bit for bit. Semantics follow Hugging Face transformers for qwen3_moe,
// qwen2_moe and mixtral, and DeepSeek's modeling code for deepseek_v2 (see
// docs/architecture.md, "Model semantics", and ../shared/fixtures/README.md).
//
// Batch invariance: every kernel works per token with a fixed reduction order, experts are
// combined in expert-index order, so a token's logits are the same bits whatever else is in
// the batch and whatever the thread count (DESIGN.md §4).
//
// Thread safety: a reference_model may run one forward() at a time; it owns its backend and
// drives it from the calling thread. kv_cache objects belong to the caller and must live on a
// backend sharing memory with the model's (make them with kv_cache{config, model.backend()};
// on cpu any cpu backend's cache serves).

#include "core/error.hpp"
#include "gpu/backend.hpp"
#include "model/config.hpp"
#include "model/kv_cache.hpp"
#include "model/layers.hpp"
#include "model/sampler.hpp"
#include "model/weights.hpp"

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace moert::model {

// Tokens to append to one sequence; they take positions cache->length() onwards.
struct forward_segment {
  kv_cache* cache;
  std::span<const std::int32_t> tokens;
};

enum class logits_for { last_token, every_token };

class reference_model {
public:
  // On a cpu backend of `num_threads` threads (from gpu/registry.hpp).
  reference_model(model_config config, model_weights weights, std::size_t num_threads);
  // Shares weights with other models (or an engine) instead of owning a copy.
  reference_model(model_config config, std::shared_ptr<const model_weights> weights, std::size_t num_threads);
  // On `backend`, which must share memory with the backend the weights were loaded on.
  reference_model(model_config config, std::shared_ptr<const model_weights> weights,
                  std::unique_ptr<gpu::backend> backend);

  const model_config& config() const { return config_; }
  const model_weights& weights() const { return *weights_; }
  gpu::backend& backend() const { return *backend_; }
  // The cpu thread count asked for (0 when given a backend).
  std::size_t num_threads() const { return num_threads_; }

  // Runs all segments' tokens as one batch and appends them to their caches. Returns
  // logits, vocab_size floats per row: one row per segment (its last token) or one per
  // token in segment order. Out-of-range token ids or an empty segment are errors, and then
  // no cache is modified.
  result<std::vector<float>> forward(std::span<const forward_segment> segments, logits_for which);

private:
  void moe_block(std::size_t layer, float* x, std::size_t num_tokens);

  model_config config_;
  std::shared_ptr<const model_weights> weights_;
  std::unique_ptr<gpu::backend> backend_;
  std::size_t num_threads_ = 0;
  rope_table rope_;
};

struct generation_request {
  std::uint64_t request_id = 0;
  std::vector<std::int32_t> prompt;
  std::size_t max_new_tokens = 0;
  sampling_params sampling;
};

enum class decode_mode {
  kv_cache,        // prefill once, then one token per step from the cache
  full_recompute,  // re-run the whole sequence every step, no cache kept
};

// Wall-clock split of a generate() call, for throughput reports.
struct generation_stats {
  double prefill_seconds = 0.0;  // the first step: every prompt token
  double decode_seconds = 0.0;   // every later step
  std::size_t prompt_tokens = 0;
  std::size_t decode_tokens = 0;  // tokens produced by the later steps
};

// Generates for all requests together (continuous batch of whatever is still running).
// Returns the new tokens of each request, in request order.
result<std::vector<std::vector<std::int32_t>>> generate(reference_model& model,
                                                        std::span<const generation_request> requests,
                                                        decode_mode mode,
                                                        generation_stats* stats = nullptr);

}  // namespace moert::model
