#pragma once

// Row-wise CPU kernels of the transformer block. Each works on one token's vector at a time
// with a fixed, sequential reduction order, so results are batch-invariant by construction.
//
// Units: element counts; f32 everywhere. Thread safety: pure functions of their arguments.

#include <cstddef>

namespace moert::cpu {

// out = x / sqrt(mean(x²) + eps) * weight, statistics in f32 (Hugging Face RMSNorm).
// `out` may alias `x`.
void rms_norm(const float* x, const float* weight, std::size_t dim, float eps, float* out);

// Rotary embedding, "rotate half" convention: element j pairs with j + dim/2.
// cos/sin hold dim/2 values for this position. In place.
void rope_rotate_half(float* x, std::size_t dim, const float* cos, const float* sin);

// Rotary embedding, interleaved convention (DeepSeek-V2): elements (2i, 2i+1) form pair i,
// rotated like the complex number x[2i] + i·x[2i+1]. cos/sin hold dim/2 values. In place.
void rope_interleaved(float* x, std::size_t dim, const float* cos, const float* sin);

// out[i] = silu(gate[i]) · up[i], silu(x) = x / (1 + e^-x). `out` may alias `gate`.
void silu_mul(const float* gate, const float* up, std::size_t dim, float* out);

// In-place numerically stable softmax.
void softmax(float* x, std::size_t dim);

// One query token's grouped-query attention over `num_positions` cached keys/values.
// q: num_heads × head_dim. keys/values: row p at keys + p·kv_stride, holding
// num_kv_heads × head_dim. Query head h reads kv head h / (num_heads / num_kv_heads).
// `scores` is scratch of num_positions floats. out: num_heads × head_dim.
void attend(const float* q, const float* keys, const float* values, std::size_t kv_stride,
            std::size_t num_positions, std::size_t num_heads, std::size_t num_kv_heads,
            std::size_t head_dim, float scale, float* scores, float* out);

// Query heads [head_begin, head_end) of attend(), each computed exactly as attend() computes
// it (a head never reads another's result), so any split of the heads gives attend()'s bits.
void attend_heads(const float* q, const float* keys, const float* values, std::size_t kv_stride,
                  std::size_t num_positions, std::size_t num_heads, std::size_t num_kv_heads,
                  std::size_t head_dim, float scale, std::size_t head_begin, std::size_t head_end, float* scores,
                  float* out);

// One query token's attention over a single shared cache row per position whose first
// `value_dim` floats are also the value (MLA with absorbed weights). q: num_heads × key_dim.
// Row p at rows + p·row_stride holds at least key_dim floats. `scores` is scratch of
// num_positions floats. out: num_heads × value_dim.
void attend_shared_row(const float* q, const float* rows, std::size_t row_stride, std::size_t num_positions,
                       std::size_t num_heads, std::size_t key_dim, std::size_t value_dim, float scale,
                       float* scores, float* out);

// Heads [head_begin, head_end) of attend_shared_row(), bit for bit as there.
void attend_shared_row_heads(const float* q, const float* rows, std::size_t row_stride, std::size_t num_positions,
                             std::size_t key_dim, std::size_t value_dim, float scale, std::size_t head_begin,
                             std::size_t head_end, float* scores, float* out);

}  // namespace moert::cpu
