#include "gpu/cuda/kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

namespace moert::cuda::kernels {

namespace {

constexpr int block_threads = 256;
constexpr int warp = 32;

unsigned grid_for(std::size_t n, int threads = block_threads) {
  std::size_t blocks = (n + std::size_t(threads) - 1) / std::size_t(threads);
  return unsigned(blocks < 65535 * 32 ? (blocks == 0 ? 1 : blocks) : 65535 * 32);
}

__device__ float warp_sum(float v) {
  for (int o = warp / 2; o > 0; o /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ float warp_max(float v) {
  for (int o = warp / 2; o > 0; o /= 2)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum or max; every thread gets the result. `shared` holds blockDim/32 floats.
template <bool is_max>
__device__ float block_reduce(float v, float* shared) {
  int lane = threadIdx.x % warp, w = threadIdx.x / warp, num_warps = (blockDim.x + warp - 1) / warp;
  v = is_max ? warp_max(v) : warp_sum(v);
  __syncthreads();  // `shared` may still be read by a previous reduction
  if (lane == 0)
    shared[w] = v;
  __syncthreads();
  float r = is_max ? -FLT_MAX : 0.0f;
  for (int i = 0; i < num_warps; ++i)
    r = is_max ? fmaxf(r, shared[i]) : r + shared[i];
  return r;
}

__global__ void rms_norm_kernel(const float* x, std::size_t x_stride, const float* weight, std::size_t dim,
                                float eps, float* out, std::size_t out_stride) {
  __shared__ float shared[block_threads / warp];
  const float* xr = x + blockIdx.x * x_stride;
  float* outr = out + blockIdx.x * out_stride;
  float sum_sq = 0.0f;
  for (std::size_t i = threadIdx.x; i < dim; i += blockDim.x)
    sum_sq += xr[i] * xr[i];
  sum_sq = block_reduce<false>(sum_sq, shared);
  float inv = 1.0f / sqrtf(sum_sq / float(dim) + eps);
  // Every thread has read its elements before the reduction's barrier, so out may alias x.
  for (std::size_t i = threadIdx.x; i < dim; i += blockDim.x)
    outr[i] = weight[i] * (xr[i] * inv);
}

__global__ void rope_kernel(float* x, std::size_t num_rows, std::size_t row_stride, std::size_t offset,
                            std::size_t num_heads, std::size_t head_stride, std::size_t half,
                            const std::int32_t* positions, const float* table, bool interleaved) {
  std::size_t total = num_rows * num_heads * half;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total;
       i += std::size_t(gridDim.x) * blockDim.x) {
    std::size_t j = i % half, h = (i / half) % num_heads, r = i / (half * num_heads);
    const float* cs = table + (positions ? std::size_t(positions[r]) : r) * 2 * half;
    float c = cs[j], s = cs[half + j];
    float* head = x + r * row_stride + offset + h * head_stride;
    std::size_t ia = interleaved ? 2 * j : j, ib = interleaved ? 2 * j + 1 : j + half;
    float a = head[ia], b = head[ib];
    head[ia] = a * c - b * s;
    head[ib] = b * c + a * s;
  }
}

// One block per (head, token): scores by warps (lanes over the key), softmax over the block,
// then threads over value elements sum weighted rows in position order.
__global__ void attend_kernel(const float* q, std::size_t q_stride, const float* const* keys,
                              const float* const* values, std::size_t kv_stride, std::size_t kv_head_offset,
                              std::size_t group, const std::int32_t* num_positions, std::size_t max_positions,
                              std::size_t num_heads, std::size_t key_dim, std::size_t value_dim, float scale,
                              float* scores, float* out, std::size_t out_stride) {
  extern __shared__ float q_shared[];  // key_dim floats
  __shared__ float red[block_threads / warp];
  std::size_t h = blockIdx.x, t = blockIdx.y;
  std::size_t positions = std::size_t(num_positions[t]);
  const float* qh = q + t * q_stride + h * key_dim;
  for (std::size_t d = threadIdx.x; d < key_dim; d += blockDim.x)
    q_shared[d] = qh[d];
  __syncthreads();
  std::size_t kv_offset = (h / group) * kv_head_offset;
  const float* k = keys[t] + kv_offset;
  const float* v = values[t] + kv_offset;
  float* s = scores + (t * num_heads + h) * max_positions;
  int lane = threadIdx.x % warp, w = threadIdx.x / warp, num_warps = blockDim.x / warp;
  for (std::size_t p = w; p < positions; p += num_warps) {
    const float* kp = k + p * kv_stride;
    float dot = 0.0f;
    for (std::size_t d = lane; d < key_dim; d += warp)
      dot += q_shared[d] * kp[d];
    dot = warp_sum(dot);
    if (lane == 0)
      s[p] = dot * scale;
  }
  __syncthreads();
  float m = -FLT_MAX;
  for (std::size_t p = threadIdx.x; p < positions; p += blockDim.x)
    m = fmaxf(m, s[p]);
  m = block_reduce<true>(m, red);
  float sum = 0.0f;
  for (std::size_t p = threadIdx.x; p < positions; p += blockDim.x) {
    float e = expf(s[p] - m);
    s[p] = e;
    sum += e;
  }
  sum = block_reduce<false>(sum, red);  // its barriers also publish the s[p] writes
  float inv = 1.0f / sum;
  float* o = out + t * out_stride + h * value_dim;
  for (std::size_t d = threadIdx.x; d < value_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (std::size_t p = 0; p < positions; ++p)
      acc += (s[p] * inv) * v[p * kv_stride + d];
    o[d] = acc;
  }
}

// One thread per row: the router's work per token is tiny (≤ 256 experts, top-k ≤ 16) and a
// sequential scan gives exactly the CPU's tie-breaking.
__global__ void route_kernel(float* logits, std::size_t num_rows, std::size_t num_experts, std::size_t top_k,
                             std::size_t num_groups, std::size_t topk_group, bool norm_topk_prob, float scaling,
                             float* scratch, std::int32_t* experts, float* weights) {
  std::size_t r = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
  if (r >= num_rows)
    return;
  float* p = logits + r * num_experts;
  float* eligible = scratch + r * num_experts;
  float m = p[0];
  for (std::size_t e = 1; e < num_experts; ++e)
    m = fmaxf(m, p[e]);
  float sum = 0.0f;
  for (std::size_t e = 0; e < num_experts; ++e) {
    p[e] = expf(p[e] - m);
    sum += p[e];
  }
  float inv = 1.0f / sum;
  for (std::size_t e = 0; e < num_experts; ++e) {
    p[e] *= inv;
    eligible[e] = p[e];
  }
  if (num_groups > 1) {
    std::size_t group_size = num_experts / num_groups;
    float group_max[64];
    for (std::size_t g = 0; g < num_groups; ++g) {
      float gm = eligible[g * group_size];
      for (std::size_t e = 1; e < group_size; ++e)
        gm = fmaxf(gm, eligible[g * group_size + e]);
      group_max[g] = gm;
    }
    unsigned long long kept = 0;  // bit g: group g is among the topk_group best
    for (std::size_t i = 0; i < topk_group; ++i) {
      int best = -1;
      for (std::size_t g = 0; g < num_groups; ++g)
        if (!(kept >> g & 1ull) && (best < 0 || group_max[g] > group_max[best]))
          best = int(g);
      kept |= 1ull << best;
    }
    for (std::size_t g = 0; g < num_groups; ++g)
      if (!(kept >> g & 1ull))
        for (std::size_t e = 0; e < group_size; ++e)
          eligible[g * group_size + e] = 0.0f;
  }
  std::int32_t* out_e = experts + r * top_k;
  float* out_w = weights + r * top_k;
  float chosen_sum = 0.0f;
  for (std::size_t s = 0; s < top_k; ++s) {
    int best = -1;
    for (std::size_t e = 0; e < num_experts; ++e)
      if (eligible[e] != -FLT_MAX && (best < 0 || eligible[e] > eligible[best]))
        best = int(e);
    eligible[best] = -FLT_MAX;  // taken (probabilities are ≥ 0)
    out_e[s] = best;
    out_w[s] = p[best];
    chosen_sum += p[best];
  }
  for (std::size_t s = 0; s < top_k; ++s)
    out_w[s] = (norm_topk_prob ? out_w[s] / chosen_sum : out_w[s]) * scaling;
  for (std::size_t i = 1; i < top_k; ++i)  // insertion sort by expert index (distinct)
    for (std::size_t j = i; j > 0 && out_e[j - 1] > out_e[j]; --j) {
      std::int32_t te = out_e[j];
      out_e[j] = out_e[j - 1];
      out_e[j - 1] = te;
      float tw = out_w[j];
      out_w[j] = out_w[j - 1];
      out_w[j - 1] = tw;
    }
}

__global__ void silu_mul_kernel(const float* gate_up, std::size_t num_rows, std::size_t inter, float* out) {
  std::size_t total = num_rows * inter;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total;
       i += std::size_t(gridDim.x) * blockDim.x) {
    std::size_t r = i / inter, c = i % inter;
    float g = gate_up[r * 2 * inter + c];
    out[i] = g / (1.0f + expf(-g)) * gate_up[r * 2 * inter + inter + c];
  }
}

__global__ void gather_kernel(const float* src, std::size_t src_stride, const std::int32_t* idx,
                              std::size_t num_rows, std::size_t dim, float* dst, std::size_t dst_stride,
                              bool scatter) {
  std::size_t total = num_rows * dim;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total;
       i += std::size_t(gridDim.x) * blockDim.x) {
    std::size_t r = i / dim, c = i % dim;
    if (scatter)
      dst[std::size_t(idx[r]) * dst_stride + c] = src[r * src_stride + c];
    else
      dst[r * dst_stride + c] = src[std::size_t(idx[r]) * src_stride + c];
  }
}

__global__ void store_rows_kernel(const float* src, std::size_t src_stride, float* const* rows_out,
                                  const float* scale, std::size_t num_rows, std::size_t dim) {
  std::size_t total = num_rows * dim;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total;
       i += std::size_t(gridDim.x) * blockDim.x) {
    std::size_t r = i / dim, c = i % dim;
    float v = src[r * src_stride + c];
    rows_out[r][c] = scale ? __fmul_rn(v, scale[r]) : v;
  }
}

__global__ void load_rows_kernel(const float* const* rows_in, std::size_t num_rows, std::size_t dim, float* dst) {
  std::size_t total = num_rows * dim;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total;
       i += std::size_t(gridDim.x) * blockDim.x)
    dst[i] = rows_in[i / dim][i % dim];
}

__global__ void combine_kernel(float* x, std::size_t hidden, std::size_t top_k, const float* const* rows,
                               const float* slot_weights, const float* side, std::size_t num_rows) {
  std::size_t total = num_rows * hidden;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total;
       i += std::size_t(gridDim.x) * blockDim.x) {
    std::size_t r = i / hidden, c = i % hidden;
    float combined = 0.0f;
    for (std::size_t s = 0; s < top_k; ++s) {
      float y = rows[r * top_k + s][c];
      // __fmul_rn/__fadd_rn keep the CPU's separate product and sum (no fused multiply-add).
      combined = __fadd_rn(combined, slot_weights ? __fmul_rn(y, slot_weights[r * top_k + s]) : y);
    }
    if (side)
      combined = __fadd_rn(combined, side[i]);
    x[i] = __fadd_rn(x[i], combined);
  }
}

__global__ void add_kernel(float* x, const float* y, std::size_t n) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x)
    x[i] += y[i];
}

// mode 0: += row-broadcast bias; 1: *= sigmoid(per-row gate); 2: *= per-row weight.
__global__ void row_op_kernel(float* out, const float* v, std::size_t num_rows, std::size_t dim, int mode) {
  std::size_t total = num_rows * dim;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total;
       i += std::size_t(gridDim.x) * blockDim.x) {
    std::size_t r = i / dim;
    if (mode == 0)
      out[i] += v[i % dim];
    else if (mode == 1)
      out[i] = (1.0f / (1.0f + expf(-v[r]))) * out[i];
    else
      out[i] = out[i] * v[r];
  }
}

// kind 0: f32→bf16, 1: f32→f16, 2: bf16→f32, 3: f16→f32.
__global__ void convert_kernel(const void* src, std::size_t n, void* dst, int kind) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    switch (kind) {
      case 0:
        static_cast<__nv_bfloat16*>(dst)[i] = __float2bfloat16_rn(static_cast<const float*>(src)[i]);
        break;
      case 1:
        static_cast<__half*>(dst)[i] = __float2half_rn(static_cast<const float*>(src)[i]);
        break;
      case 2:
        static_cast<float*>(dst)[i] = __bfloat162float(static_cast<const __nv_bfloat16*>(src)[i]);
        break;
      default:
        static_cast<float*>(dst)[i] = __half2float(static_cast<const __half*>(src)[i]);
        break;
    }
  }
}

cudaError_t launched() {
  return cudaGetLastError();
}

}  // namespace

cudaError_t rms_norm(const float* x, std::size_t x_stride, const float* weight, std::size_t num_rows,
                     std::size_t dim, float eps, float* out, std::size_t out_stride, cudaStream_t stream) {
  if (num_rows == 0)
    return cudaSuccess;
  int threads = dim >= 256 ? 256 : dim > 64 ? 128 : 64;
  rms_norm_kernel<<<unsigned(num_rows), threads, 0, stream>>>(x, x_stride, weight, dim, eps, out, out_stride);
  return launched();
}

cudaError_t rope(float* x, std::size_t num_rows, std::size_t row_stride, std::size_t offset,
                 std::size_t num_heads, std::size_t head_stride, std::size_t half, const std::int32_t* positions,
                 const float* table, bool interleaved, cudaStream_t stream) {
  std::size_t n = num_rows * num_heads * half;
  if (n == 0)
    return cudaSuccess;
  rope_kernel<<<grid_for(n), block_threads, 0, stream>>>(x, num_rows, row_stride, offset, num_heads, head_stride,
                                                          half, positions, table, interleaved);
  return launched();
}

cudaError_t attend(const float* q, std::size_t q_stride, const float* const* keys, const float* const* values,
                   std::size_t kv_stride, std::size_t kv_head_offset, std::size_t group,
                   const std::int32_t* num_positions, std::size_t max_positions, std::size_t num_tokens,
                   std::size_t num_heads, std::size_t key_dim, std::size_t value_dim, float scale, float* scores,
                   float* out, std::size_t out_stride, cudaStream_t stream) {
  // gridDim.y stops at 65535: longer batches go in chunks of tokens.
  constexpr std::size_t max_chunk = 65535;
  for (std::size_t t0 = 0; t0 < num_tokens; t0 += max_chunk) {
    std::size_t n = num_tokens - t0 < max_chunk ? num_tokens - t0 : max_chunk;
    dim3 grid{unsigned(num_heads), unsigned(n)};
    attend_kernel<<<grid, 128, key_dim * sizeof(float), stream>>>(
        q + t0 * q_stride, q_stride, keys + t0, values + t0, kv_stride, kv_head_offset, group, num_positions + t0,
        max_positions, num_heads, key_dim, value_dim, scale, scores + t0 * num_heads * max_positions,
        out + t0 * out_stride, out_stride);
    if (cudaError_t rc = launched(); rc != cudaSuccess)
      return rc;
  }
  return cudaSuccess;
}

cudaError_t route_topk(float* logits, std::size_t num_rows, std::size_t num_experts, std::size_t top_k,
                       std::size_t num_groups, std::size_t topk_group, bool norm_topk_prob, float scaling,
                       float* scratch, std::int32_t* experts, float* weights, cudaStream_t stream) {
  if (num_rows == 0)
    return cudaSuccess;
  route_kernel<<<grid_for(num_rows, 64), 64, 0, stream>>>(logits, num_rows, num_experts, top_k, num_groups,
                                                          topk_group, norm_topk_prob, scaling, scratch, experts,
                                                          weights);
  return launched();
}

cudaError_t silu_mul(const float* gate_up, std::size_t num_rows, std::size_t inter, float* out,
                     cudaStream_t stream) {
  if (num_rows * inter == 0)
    return cudaSuccess;
  silu_mul_kernel<<<grid_for(num_rows * inter), block_threads, 0, stream>>>(gate_up, num_rows, inter, out);
  return launched();
}

cudaError_t gather_rows(const float* src, std::size_t src_stride, const std::int32_t* idx, std::size_t num_rows,
                        std::size_t dim, float* dst, std::size_t dst_stride, cudaStream_t stream) {
  if (num_rows * dim == 0)
    return cudaSuccess;
  gather_kernel<<<grid_for(num_rows * dim), block_threads, 0, stream>>>(src, src_stride, idx, num_rows, dim, dst,
                                                                         dst_stride, false);
  return launched();
}

cudaError_t scatter_rows(const float* src, std::size_t src_stride, const std::int32_t* idx, std::size_t num_rows,
                         std::size_t dim, float* dst, std::size_t dst_stride, cudaStream_t stream) {
  if (num_rows * dim == 0)
    return cudaSuccess;
  gather_kernel<<<grid_for(num_rows * dim), block_threads, 0, stream>>>(src, src_stride, idx, num_rows, dim, dst,
                                                                         dst_stride, true);
  return launched();
}

cudaError_t store_rows(const float* src, std::size_t src_stride, float* const* rows_out, const float* scale,
                       std::size_t num_rows, std::size_t dim, cudaStream_t stream) {
  if (num_rows * dim == 0)
    return cudaSuccess;
  store_rows_kernel<<<grid_for(num_rows * dim), block_threads, 0, stream>>>(src, src_stride, rows_out, scale,
                                                                             num_rows, dim);
  return launched();
}

cudaError_t load_rows(const float* const* rows_in, std::size_t num_rows, std::size_t dim, float* dst,
                      cudaStream_t stream) {
  if (num_rows * dim == 0)
    return cudaSuccess;
  load_rows_kernel<<<grid_for(num_rows * dim), block_threads, 0, stream>>>(rows_in, num_rows, dim, dst);
  return launched();
}

cudaError_t combine(float* x, std::size_t hidden, std::size_t top_k, const float* const* rows,
                    const float* slot_weights, const float* side, std::size_t num_rows, cudaStream_t stream) {
  if (num_rows * hidden == 0)
    return cudaSuccess;
  combine_kernel<<<grid_for(num_rows * hidden), block_threads, 0, stream>>>(x, hidden, top_k, rows, slot_weights,
                                                                             side, num_rows);
  return launched();
}

cudaError_t add(float* x, const float* y, std::size_t n, cudaStream_t stream) {
  if (n == 0)
    return cudaSuccess;
  add_kernel<<<grid_for(n), block_threads, 0, stream>>>(x, y, n);
  return launched();
}

cudaError_t add_bias(float* out, const float* bias, std::size_t num_rows, std::size_t dim, cudaStream_t stream) {
  if (num_rows * dim == 0)
    return cudaSuccess;
  row_op_kernel<<<grid_for(num_rows * dim), block_threads, 0, stream>>>(out, bias, num_rows, dim, 0);
  return launched();
}

cudaError_t scale_by_sigmoid(float* out, const float* gate, std::size_t num_rows, std::size_t dim,
                             cudaStream_t stream) {
  if (num_rows * dim == 0)
    return cudaSuccess;
  row_op_kernel<<<grid_for(num_rows * dim), block_threads, 0, stream>>>(out, gate, num_rows, dim, 1);
  return launched();
}

cudaError_t scale_rows(float* out, const float* w, std::size_t num_rows, std::size_t dim, cudaStream_t stream) {
  if (num_rows * dim == 0)
    return cudaSuccess;
  row_op_kernel<<<grid_for(num_rows * dim), block_threads, 0, stream>>>(out, w, num_rows, dim, 2);
  return launched();
}

namespace {

cudaError_t convert(const void* src, std::size_t n, void* dst, int kind, cudaStream_t stream) {
  if (n == 0)
    return cudaSuccess;
  convert_kernel<<<grid_for(n), block_threads, 0, stream>>>(src, n, dst, kind);
  return launched();
}

}  // namespace

cudaError_t f32_to_bf16(const float* src, std::size_t n, std::uint16_t* dst, cudaStream_t stream) {
  return convert(src, n, dst, 0, stream);
}
cudaError_t f32_to_f16(const float* src, std::size_t n, std::uint16_t* dst, cudaStream_t stream) {
  return convert(src, n, dst, 1, stream);
}
cudaError_t bf16_to_f32(const std::uint16_t* src, std::size_t n, float* dst, cudaStream_t stream) {
  return convert(src, n, dst, 2, stream);
}
cudaError_t f16_to_f32(const std::uint16_t* src, std::size_t n, float* dst, cudaStream_t stream) {
  return convert(src, n, dst, 3, stream);
}

}  // namespace moert::cuda::kernels
