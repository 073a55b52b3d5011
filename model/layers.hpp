#pragma once

// The steps of one decoder layer, cut where disaggregated expert parallelism cuts it:
//
//   attention_step   norm → q/k/v → (q/k norm) → RoPE → cache → attention → o_proj → residual;
//                    for deepseek_v2 multi-head latent attention on the compressed cache
//   route_step       post-attention norm → router softmax → (group-limited) top-k, scaled,
//                    ordered by expert index
//   side_ffn_step    what stays on the attention side: the dense MLP of a dense layer, or the
//                    shared expert (gated for qwen2_moe); nothing otherwise
//   expert_step      one routed expert on a batch of rows
//   combine_step     residual += Σ_k expert_k · weight_k (expert-index order) + side output
//   logits_step      final norm → lm_head
//
// The reference forward and the actor runtime call these same functions, which is what makes
// the two bit-identical: every step is per row with a fixed reduction order (DESIGN.md §4).
// Each step is written once against the operations of gpu/backend.hpp and runs on whatever
// backend it is given.
//
// Units: element counts; rows are hidden_size floats. Memory: activation pointers (x, normed,
// in, out, logits, side, weighted rows) and caches are in `backend`'s memory (host memory on
// the cpu backend); routes and token ids are host memory; weights must live on a backend that
// shares memory with `backend`. Thread safety: functions of their arguments; `backend` is
// used by one caller at a time (its device executor).

#include "gpu/backend.hpp"
#include "model/config.hpp"
#include "model/kv_cache.hpp"
#include "model/weights.hpp"

#include <cstdint>
#include <span>
#include <vector>

namespace moert::model {

// cos/sin of RoPE per position, computed as Hugging Face does (f32 angle = pos · inv_freq),
// over config.rope_dim(). With YaRN (deepseek_v2) the frequencies are blended between
// interpolation and extrapolation and cos/sin carry the mscale ratio, as DeepSeek computes them.
// Grown on demand; not thread-safe while growing.
class rope_table {
public:
  explicit rope_table(const model_config& config);
  // Makes positions [0, max_position] available.
  void ensure(std::size_t max_position);
  // rope_dim/2 cos values followed by rope_dim/2 sin values.
  const float* row(std::size_t position) const { return cos_sin_.data() + position * 2 * inv_freq_.size(); }
  // Row 0: position p's row is at table() + p · rope_dim (host memory).
  const float* table() const { return cos_sin_.data(); }
  // The factor attention scores are multiplied by before the softmax: head_dim^-0.5, times
  // mscale(factor, mscale_all_dim)² under YaRN.
  float attention_scale() const { return attention_scale_; }

private:
  std::vector<float> inv_freq_;
  float magnitude_ = 1.0f;  // YaRN mscale(factor, mscale) / mscale(factor, mscale_all_dim)
  float attention_scale_;
  std::vector<float> cos_sin_;
};

// Where a row's token lives. The cache must have been grown to hold `position`.
struct token_slot {
  kv_cache* cache;
  std::size_t position;
};

using routed_slot = gpu::routed_slot;

// x (rows × hidden) = the embedding rows of `token_ids` (each in [0, vocab_size)).
void embed_step(const model_config& config, const model_weights& weights, std::span<const std::int32_t> token_ids,
                float* x, gpu::backend& backend);

// x: rows × hidden residual stream, updated in place. `rope` must cover every position; each
// token's cache must live on `backend`.
void attention_step(const model_config& config, const model_weights& weights, const rope_table& rope,
                    std::size_t layer, std::span<const token_slot> tokens, float* x,
                    gpu::backend& backend);

// normed (rows × hidden) = post-attention norm of x. For sparse layers, routes
// (rows × top_k) = the top-k experts by router probability (among the experts of the best
// topk_group groups for group_limited_greedy), weights optionally renormalised and then
// multiplied by routed_scaling_factor, sorted by expert index.
void route_step(const model_config& config, const model_weights& weights, std::size_t layer,
                const float* x, std::size_t num_rows, float* normed, routed_slot* routes,
                gpu::backend& backend);

// True when this layer has attention-side FFN work (dense MLP or shared expert).
bool has_side_ffn(const model_config& config, std::size_t layer);

// out (rows × hidden) = dense MLP, or shared expert (× sigmoid(shared_expert_gate) when gated),
// of normed.
void side_ffn_step(const model_config& config, const model_weights& weights, std::size_t layer,
                   const float* normed, std::size_t num_rows, float* out, gpu::backend& backend);

// out (rows × hidden) = SwiGLU MLP of `expert` in `layer` on `in` (experts_step with one entry).
void expert_step(const model_weights& weights, std::size_t layer, std::size_t expert, const float* in,
                 std::size_t num_rows, float* out, gpu::backend& backend);

// A device's expert batch in one call: entry i runs expert `expert` of the layer on its
// `num_rows` rows `in` into `out` (backend memory, rows × hidden). The GEMMs of every entry go
// through backend::matmul_batch (one grouped or dense GEMM per expert on cuda, by load); each
// entry's bits are expert_step's.
struct expert_rows {
  std::size_t expert;
  const float* in;
  std::size_t num_rows;
  float* out;
};
void experts_step(const model_weights& weights, std::size_t layer, std::span<const expert_rows> batch,
                  gpu::backend& backend);

// Scales an expert's output row by its routing weight, as the combine expects it (host
// memory; gpu::backend::weight_rows is the same on a backend).
void weight_row(const float* y, float weight, std::size_t hidden, float* out);

// x[r] += (Σ_k weighted[r·top_k + k]) + side[r], the sum from zero in slot order (= expert
// order). weighted: rows × top_k row pointers, each already multiplied by its routing weight
// (they may point into different expert-output blocks); side may be null.
void combine_step(std::size_t hidden, std::size_t top_k, const float* const* weighted, const float* side,
                  std::size_t num_rows, float* x, gpu::backend& backend);

// logits (rows × vocab) = lm_head(final_norm(x rows)).
void logits_step(const model_config& config, const model_weights& weights, const float* x,
                 std::size_t num_rows, float* logits, gpu::backend& backend);

}  // namespace moert::model
