#pragma once

// CUDA kernels of the transformer block, as launchers: raw device pointers, sizes and the
// stream; each returns the launch's cudaError_t (cudaGetLastError). Like FlashInfer's kernel
// headers this one includes nothing of the framework; gpu/cuda/ops.hpp wraps it in
// moert::status and checks arguments.
//
// Semantics match gpu/cpu/ops.hpp row for row; reductions run in parallel, so results agree
// with the CPU backend to rounding (f32: ~1e-6 relative), not bit for bit.
// Units: element counts; all floats f32 unless a name says bf16/f16. Row-major.

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace moert::cuda::kernels {

// out[r][0..dim) = x[r][0..dim) / sqrt(mean(x²) + eps) * weight; rows at x + r·x_stride and
// out + r·out_stride (out may alias x). Per-head norm: rows = tokens × heads, stride head_dim.
cudaError_t rms_norm(const float* x, std::size_t x_stride, const float* weight, std::size_t num_rows,
                     std::size_t dim, float eps, float* out, std::size_t out_stride, cudaStream_t stream);

// RoPE in place on `num_heads` heads of every row: head h of row r starts at
// x + r·row_stride + offset + h·head_stride and its first 2·half elements rotate. table row p
// (p = positions[r], or p = r when positions is null) holds half cos then half sin values.
// interleaved: pairs (2i, 2i+1) (DeepSeek); otherwise rotate-half pairs (i, i + half).
cudaError_t rope(float* x, std::size_t num_rows, std::size_t row_stride, std::size_t offset,
                 std::size_t num_heads, std::size_t head_stride, std::size_t half, const std::int32_t* positions,
                 const float* table, bool interleaved, cudaStream_t stream);

// Attention of each query token over its own cache (decode and prefill alike: token t sees
// num_positions[t] rows). Query head h of token t: q + t·q_stride + h·key_dim. Its key row p
// is keys[t] + p·kv_stride + (h / group)·kv_head_offset, value row values[t] + the same (MLA:
// keys == values, kv_head_offset 0, value = the first value_dim floats of the row). keys and
// values are device arrays of num_tokens device pointers. scores: scratch of
// num_tokens·num_heads·max_positions floats. out: token t head h at out + t·out_stride +
// h·value_dim.
cudaError_t attend(const float* q, std::size_t q_stride, const float* const* keys, const float* const* values,
                   std::size_t kv_stride, std::size_t kv_head_offset, std::size_t group,
                   const std::int32_t* num_positions, std::size_t max_positions, std::size_t num_tokens,
                   std::size_t num_heads, std::size_t key_dim, std::size_t value_dim, float scale, float* scores,
                   float* out, std::size_t out_stride, cudaStream_t stream);

// Router: per row, softmax over num_experts logits (in place), then the top_k experts among
// the eligible ones (ties to the lower index). num_groups > 1 (group-limited greedy): only the
// topk_group groups with the largest maximum probability are eligible. Weights are the
// probabilities, divided by their sum over the chosen when norm_topk_prob, times
// scaling; slots are ordered by expert index. scratch: num_rows·num_experts floats.
// num_groups ≤ 64.
cudaError_t route_topk(float* logits, std::size_t num_rows, std::size_t num_experts, std::size_t top_k,
                       std::size_t num_groups, std::size_t topk_group, bool norm_topk_prob, float scaling,
                       float* scratch, std::int32_t* experts, float* weights, cudaStream_t stream);

// out[r][i] = silu(gate_up[r][i]) · gate_up[r][inter + i] (gate then up in one row).
cudaError_t silu_mul(const float* gate_up, std::size_t num_rows, std::size_t inter, float* out,
                     cudaStream_t stream);

// dst[i·dst_stride ..] = src[idx[i]·src_stride ..], dim floats, i < num_rows (gather; also the
// embedding lookup).
cudaError_t gather_rows(const float* src, std::size_t src_stride, const std::int32_t* idx, std::size_t num_rows,
                        std::size_t dim, float* dst, std::size_t dst_stride, cudaStream_t stream);
// dst[idx[i]·dst_stride ..] = src[i·src_stride ..] (scatter; idx distinct).
cudaError_t scatter_rows(const float* src, std::size_t src_stride, const std::int32_t* idx, std::size_t num_rows,
                         std::size_t dim, float* dst, std::size_t dst_stride, cudaStream_t stream);
// rows_out[i][0..dim) = src[i·src_stride ..] (· scale[i] when scale is not null): K and V into
// the caches of different sequences, an expert's output rows weighted into their slots.
// rows_out and scale are device arrays of num_rows entries.
cudaError_t store_rows(const float* src, std::size_t src_stride, float* const* rows_out, const float* scale,
                       std::size_t num_rows, std::size_t dim, cudaStream_t stream);
// dst[i·dim ..] = rows_in[i][0..dim) (rows_in: device array of row pointers).
cudaError_t load_rows(const float* const* rows_in, std::size_t num_rows, std::size_t dim, float* dst,
                      cudaStream_t stream);

// x[r] += (Σ_s rows[r·top_k + s] · slot_weights[r·top_k + s]) + side[r], the sum from zero in
// slot order (the CPU's expert-index order), products and sums rounded separately as on the
// CPU. rows: device array of num_rows·top_k row pointers (hidden floats each); slot_weights
// null: the rows are already weighted; side may be null.
cudaError_t combine(float* x, std::size_t hidden, std::size_t top_k, const float* const* rows,
                    const float* slot_weights, const float* side, std::size_t num_rows, cudaStream_t stream);

// x[i] += y[i], i < n.
cudaError_t add(float* x, const float* y, std::size_t n, cudaStream_t stream);
// out[r][i] += bias[i].
cudaError_t add_bias(float* out, const float* bias, std::size_t num_rows, std::size_t dim, cudaStream_t stream);
// out[r][i] *= sigmoid(gate[r]) (qwen2_moe's shared-expert gate).
cudaError_t scale_by_sigmoid(float* out, const float* gate, std::size_t num_rows, std::size_t dim,
                             cudaStream_t stream);
// out[r][i] *= w[r].
cudaError_t scale_rows(float* out, const float* w, std::size_t num_rows, std::size_t dim, cudaStream_t stream);

// Element conversions (round to nearest even), n elements; the 16-bit side is raw bits.
cudaError_t f32_to_bf16(const float* src, std::size_t n, std::uint16_t* dst, cudaStream_t stream);
cudaError_t f32_to_f16(const float* src, std::size_t n, std::uint16_t* dst, cudaStream_t stream);
cudaError_t bf16_to_f32(const std::uint16_t* src, std::size_t n, float* dst, cudaStream_t stream);
cudaError_t f16_to_f32(const std::uint16_t* src, std::size_t n, float* dst, cudaStream_t stream);

}  // namespace moert::cuda::kernels
