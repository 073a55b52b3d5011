#include "gpu/cpu/ops.hpp"

#include <cmath>

namespace moert::cpu {

void rms_norm(const float* x, const float* weight, std::size_t dim, float eps, float* out) {
  float sum_sq = 0.0f;
  for (std::size_t i = 0; i < dim; ++i)
    sum_sq += x[i] * x[i];
  float inv = 1.0f / std::sqrt(sum_sq / float(dim) + eps);
  for (std::size_t i = 0; i < dim; ++i)
    out[i] = weight[i] * (x[i] * inv);
}

void rope_rotate_half(float* x, std::size_t dim, const float* cos, const float* sin) {
  std::size_t half = dim / 2;
  for (std::size_t j = 0; j < half; ++j) {
    float a = x[j];
    float b = x[j + half];
    x[j] = a * cos[j] - b * sin[j];
    x[j + half] = b * cos[j] + a * sin[j];
  }
}

void rope_interleaved(float* x, std::size_t dim, const float* cos, const float* sin) {
  for (std::size_t i = 0; i < dim / 2; ++i) {
    float a = x[2 * i];
    float b = x[2 * i + 1];
    x[2 * i] = a * cos[i] - b * sin[i];
    x[2 * i + 1] = b * cos[i] + a * sin[i];
  }
}

void silu_mul(const float* gate, const float* up, std::size_t dim, float* out) {
  for (std::size_t i = 0; i < dim; ++i) {
    float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void softmax(float* x, std::size_t dim) {
  float max = x[0];
  for (std::size_t i = 1; i < dim; ++i)
    max = std::fmax(max, x[i]);
  float sum = 0.0f;
  for (std::size_t i = 0; i < dim; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  float inv = 1.0f / sum;
  for (std::size_t i = 0; i < dim; ++i)
    x[i] *= inv;
}

namespace {

// One query head over `num_positions` cached rows: scores, softmax, weighted sum of values,
// every reduction in position order. Row p's key starts at keys + p·stride, its value at
// values + p·stride.
// Positions whose score chains run side by side: one dot product is a chain of dependent adds
// (latency-bound, ~3 cycles per element), so interleaving 8 positions keeps the FP pipes busy.
// Each position's chain and its order over d are the same as alone, so the bits are too.
constexpr std::size_t score_block = 8;

void attend_head(const float* qh, const float* keys, const float* values, std::size_t stride,
                 std::size_t num_positions, std::size_t key_dim, std::size_t value_dim, float scale,
                 float* scores, float* __restrict oh) {
  std::size_t p = 0;
  for (; p + score_block <= num_positions; p += score_block) {
    const float* k = keys + p * stride;
    float dot[score_block] = {};
    for (std::size_t d = 0; d < key_dim; ++d) {
      const float qd = qh[d];
#pragma GCC unroll 8
      for (std::size_t j = 0; j < score_block; ++j)
        dot[j] += qd * k[j * stride + d];
    }
    for (std::size_t j = 0; j < score_block; ++j)
      scores[p + j] = dot[j] * scale;
  }
  for (; p < num_positions; ++p) {
    const float* k = keys + p * stride;
    float dot = 0.0f;
    for (std::size_t d = 0; d < key_dim; ++d)
      dot += qh[d] * k[d];
    scores[p] = dot * scale;
  }
  softmax(scores, num_positions);
  for (std::size_t d = 0; d < value_dim; ++d)
    oh[d] = 0.0f;
  for (p = 0; p < num_positions; ++p) {
    const float* __restrict v = values + p * stride;
    const float w = scores[p];
    // Lanes over d are independent chains over p, so vectorizing keeps every chain's order.
#pragma GCC ivdep
    for (std::size_t d = 0; d < value_dim; ++d)
      oh[d] += w * v[d];
  }
}

}  // namespace

void attend(const float* q, const float* keys, const float* values, std::size_t kv_stride,
            std::size_t num_positions, std::size_t num_heads, std::size_t num_kv_heads,
            std::size_t head_dim, float scale, float* scores, float* out) {
  attend_heads(q, keys, values, kv_stride, num_positions, num_heads, num_kv_heads, head_dim, scale, 0, num_heads,
               scores, out);
}

void attend_heads(const float* q, const float* keys, const float* values, std::size_t kv_stride,
                  std::size_t num_positions, std::size_t num_heads, std::size_t num_kv_heads,
                  std::size_t head_dim, float scale, std::size_t head_begin, std::size_t head_end, float* scores,
                  float* out) {
  std::size_t group = num_heads / num_kv_heads;
  for (std::size_t h = head_begin; h < head_end; ++h) {
    std::size_t kv_offset = (h / group) * head_dim;
    attend_head(q + h * head_dim, keys + kv_offset, values + kv_offset, kv_stride, num_positions, head_dim,
                head_dim, scale, scores, out + h * head_dim);
  }
}

void attend_shared_row(const float* q, const float* rows, std::size_t row_stride, std::size_t num_positions,
                       std::size_t num_heads, std::size_t key_dim, std::size_t value_dim, float scale,
                       float* scores, float* out) {
  attend_shared_row_heads(q, rows, row_stride, num_positions, key_dim, value_dim, scale, 0, num_heads, scores, out);
}

void attend_shared_row_heads(const float* q, const float* rows, std::size_t row_stride, std::size_t num_positions,
                             std::size_t key_dim, std::size_t value_dim, float scale, std::size_t head_begin,
                             std::size_t head_end, float* scores, float* out) {
  for (std::size_t h = head_begin; h < head_end; ++h)
    attend_head(q + h * key_dim, rows, rows, row_stride, num_positions, key_dim, value_dim, scale, scores,
                out + h * value_dim);
}

}  // namespace moert::cpu
