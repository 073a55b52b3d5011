#include "gpu/cpu/ops.hpp"

#include <cmath>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

#if defined(__SSE2__)
// Scores of 4 × groups positions from p on. A dot product is a chain of dependent adds over
// d (~3 cycles each), so `groups` chains run side by side; a 4 × 4 transpose turns four
// positions' rows into one vector per d, so each lane still adds its products in d order from
// +0.0f, the bits of the scalar loop in attend_head.
template <std::size_t groups>
void score_positions(const float* qh, const float* keys, std::size_t stride, std::size_t p, std::size_t key_dim,
                     float scale, float* scores) {
  const float* k = keys + p * stride;
  __m128 acc[groups];
  for (__m128& a : acc)
    a = _mm_setzero_ps();
  std::size_t d = 0;
  for (; d + 4 <= key_dim; d += 4) {
    const __m128 q4 = _mm_loadu_ps(qh + d);
    const __m128 qd[4] = {_mm_shuffle_ps(q4, q4, 0x00), _mm_shuffle_ps(q4, q4, 0x55), _mm_shuffle_ps(q4, q4, 0xaa),
                          _mm_shuffle_ps(q4, q4, 0xff)};
#pragma GCC unroll 4
    for (std::size_t g = 0; g < groups; ++g) {
      const float* kg = k + 4 * g * stride + d;
      __m128 r0 = _mm_loadu_ps(kg), r1 = _mm_loadu_ps(kg + stride), r2 = _mm_loadu_ps(kg + 2 * stride),
             r3 = _mm_loadu_ps(kg + 3 * stride);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      acc[g] = _mm_add_ps(acc[g], _mm_mul_ps(qd[0], r0));
      acc[g] = _mm_add_ps(acc[g], _mm_mul_ps(qd[1], r1));
      acc[g] = _mm_add_ps(acc[g], _mm_mul_ps(qd[2], r2));
      acc[g] = _mm_add_ps(acc[g], _mm_mul_ps(qd[3], r3));
    }
  }
  float dot[4 * groups];
  for (std::size_t g = 0; g < groups; ++g)
    _mm_storeu_ps(dot + 4 * g, acc[g]);
  for (; d < key_dim; ++d)
    for (std::size_t j = 0; j < 4 * groups; ++j)
      dot[j] += qh[d] * k[j * stride + d];
  for (std::size_t j = 0; j < 4 * groups; ++j)
    scores[p + j] = dot[j] * scale;
}
#endif

// One query head over `num_positions` cached rows: scores, softmax, weighted sum of values,
// every reduction in position order. Row p's key starts at keys + p·stride, its value at
// values + p·stride.
void attend_head(const float* qh, const float* keys, const float* values, std::size_t stride,
                 std::size_t num_positions, std::size_t key_dim, std::size_t value_dim, float scale,
                 float* scores, float* oh) {
  std::size_t p = 0;
#if defined(__SSE2__)
  for (; p + 16 <= num_positions; p += 16)
    score_positions<4>(qh, keys, stride, p, key_dim, scale, scores);
  for (; p + 4 <= num_positions; p += 4)
    score_positions<1>(qh, keys, stride, p, key_dim, scale, scores);
#endif
  for (; p < num_positions; ++p) {
    const float* k = keys + p * stride;
    float dot = 0.0f;
    for (std::size_t d = 0; d < key_dim; ++d)
      dot += qh[d] * k[d];
    scores[p] = dot * scale;
  }
  softmax(scores, num_positions);
  // Each output lane d is one chain over positions in order; 32 lanes at a time stay in
  // registers (the compiler keeps oh[] in memory and scalar), the rest go one by one.
  std::size_t d0 = 0;
#if defined(__SSE2__)
  constexpr std::size_t lanes = 32;
  for (; d0 + lanes <= value_dim; d0 += lanes) {
    __m128 acc[lanes / 4];
    for (__m128& a : acc)
      a = _mm_setzero_ps();
    for (p = 0; p < num_positions; ++p) {
      const float* v = values + p * stride + d0;
      const __m128 w = _mm_set1_ps(scores[p]);
#pragma GCC unroll 8
      for (std::size_t i = 0; i < lanes / 4; ++i)
        acc[i] = _mm_add_ps(acc[i], _mm_mul_ps(w, _mm_loadu_ps(v + 4 * i)));
    }
    for (std::size_t i = 0; i < lanes / 4; ++i)
      _mm_storeu_ps(oh + d0 + 4 * i, acc[i]);
  }
#endif
  for (std::size_t d = d0; d < value_dim; ++d)
    oh[d] = 0.0f;
  for (p = 0; p < num_positions; ++p) {
    const float* v = values + p * stride;
    const float w = scores[p];
    for (std::size_t d = d0; d < value_dim; ++d)
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
