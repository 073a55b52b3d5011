#include "gpu/cpu/backend.hpp"

#include "gpu/cpu/ops.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

namespace moert::cpu {

const packed_matrix& packed_of(const gpu::matrix& m) {
  static const packed_matrix none;
  const gpu::matrix_storage* s = m.storage();
  if (s == nullptr)
    return none;
  if (s->kind() != gpu::backend_kind::cpu) {
    std::fprintf(stderr, "moert: a %s matrix was given to the cpu backend\n", gpu::to_string(s->kind()));
    std::abort();
  }
  return static_cast<const cpu_matrix*>(s)->packed();
}

namespace {

// Attention tasks are (row, query head) pairs, task = row · num_heads + head. Calls
// fn(row, head_begin, head_end, scores) for each row's run of heads in [begin, end), with
// `scores` room for that row's positions.
template <class attend_fn>
void for_row_heads(std::span<const gpu::kv_rows> rows, std::size_t num_heads, std::size_t begin, std::size_t end,
                   attend_fn fn) {
  std::vector<float> scores;
  for (std::size_t task = begin; task < end;) {
    std::size_t t = task / num_heads, h = task % num_heads;
    std::size_t h_end = std::min(num_heads, h + (end - task));
    scores.resize(rows[t].num_positions);
    fn(t, h, h_end, scores.data());
    task += h_end - h;
  }
}

}  // namespace

cpu_backend::cpu_backend(std::size_t num_threads) {
  if (num_threads > 1) {
    owned_pool_ = std::make_unique<thread_pool>(num_threads);
    pool_ = owned_pool_.get();
  }
}

cpu_backend::cpu_backend(thread_pool* pool) : pool_(pool) {}

std::string cpu_backend::name() const {
  return "cpu (" + std::string(matmul_kernel_name()) + ", " + std::to_string(num_threads()) +
         (num_threads() == 1 ? " thread)" : " threads)");
}

// -- memory -----------------------------------------------------------------------------------

gpu::buffer cpu_backend::allocate(std::size_t num_bytes) {
  if (num_bytes == 0)
    return {};
  void* p = std::aligned_alloc(64, (num_bytes + 63) / 64 * 64);  // a multiple of the alignment
  if (p == nullptr)
    throw std::bad_alloc{};
  return gpu::buffer{std::shared_ptr<void>(p, std::free), num_bytes, gpu::backend_kind::cpu};
}

void cpu_backend::upload(void* dst, const void* src_host, std::size_t num_bytes) {
  if (num_bytes != 0)
    std::memcpy(dst, src_host, num_bytes);
}

void cpu_backend::download(void* dst_host, const void* src, std::size_t num_bytes) {
  if (num_bytes != 0)
    std::memcpy(dst_host, src, num_bytes);
}

void cpu_backend::copy(void* dst, const void* src, std::size_t num_bytes) {
  if (num_bytes != 0)
    std::memmove(dst, src, num_bytes);
}

result<gpu::matrix> cpu_backend::upload_matrix(dtype type, std::size_t cols,
                                               std::span<const gpu::matrix_part> parts) {
  std::vector<matrix_part> cpu_parts;
  cpu_parts.reserve(parts.size());
  for (const gpu::matrix_part& part : parts) {
    // A narrowing conversion would round, and then the bits would no longer be the stored ones.
    if (part.type != type && type != dtype::f32)
      return make_error(error_code::invalid_argument, "cannot hold " + std::string(safetensors_name(part.type)) +
                                                          " weights as " + std::string(safetensors_name(type)));
    cpu_parts.push_back({part.data, part.type, part.rows, part.row_stride, part.col_stride});
  }
  return gpu::matrix{std::make_unique<const cpu_matrix>(packed_matrix::pack(type, cols, cpu_parts))};
}

// -- operations -------------------------------------------------------------------------------

void cpu_backend::matmul(const float* x, std::size_t num_rows, const gpu::matrix& w, float* y, const float* bias) {
  cpu::matmul(x, num_rows, packed_of(w), y, pool_);
  if (bias == nullptr)
    return;
  std::size_t n = w.rows();
  for (std::size_t r = 0; r < num_rows; ++r)
    for (std::size_t i = 0; i < n; ++i)
      y[r * n + i] += bias[i];
}

void cpu_backend::matmul_batch(std::span<const gpu::batched_matmul> batch) {
  std::vector<matmul_entry> entries;
  entries.reserve(batch.size());
  for (const gpu::batched_matmul& m : batch)
    entries.push_back({&packed_of(*m.w), m.x, m.num_rows, m.y});
  cpu::matmul_batch(entries, pool_);
}

void cpu_backend::rms_norm(const float* x, std::size_t num_rows, std::size_t dim, std::size_t row_stride,
                           const float* weight, float eps, float* out) {
  for (std::size_t r = 0; r < num_rows; ++r)
    cpu::rms_norm(x + r * row_stride, weight, dim, eps, out + r * row_stride);
}

void cpu_backend::rope(float* x, std::size_t num_rows, std::size_t row_stride, std::size_t num_heads,
                       std::size_t head_stride, std::size_t dim, gpu::rope_style style, const float* table_host,
                       const std::size_t* positions_host) {
  std::size_t half = dim / 2;
  for (std::size_t r = 0; r < num_rows; ++r) {
    const float* cs = table_host + positions_host[r] * dim;
    for (std::size_t h = 0; h < num_heads; ++h) {
      float* head = x + r * row_stride + h * head_stride;
      if (style == gpu::rope_style::rotate_half)
        rope_rotate_half(head, dim, cs, cs + half);
      else
        rope_interleaved(head, dim, cs, cs + half);
    }
  }
}

void cpu_backend::attention(const float* q, std::span<const gpu::kv_rows> rows_host,
                            const gpu::attention_shape& s, float* out) {
  std::size_t q_dim = s.num_heads * s.head_dim;
  // Tasks are (row, query head) pairs, so one long-context decode row spreads over every
  // thread too. A head's result never depends on the split (attend_heads), so the bits are
  // those of the serial loop.
  auto attend_pairs = [&](std::size_t begin, std::size_t end) {
    for_row_heads(rows_host, s.num_heads, begin, end, [&](std::size_t t, std::size_t h, std::size_t h_end, float* scores) {
      const gpu::kv_rows& kv = rows_host[t];
      attend_heads(q + t * q_dim, kv.keys, kv.values, s.kv_stride, kv.num_positions, s.num_heads, s.num_kv_heads,
                   s.head_dim, s.scale, h, h_end, scores, out + t * q_dim);
    });
  };
  std::size_t work = 0;  // scalar loops: a multiply-add here costs ~32 of the matmul's
  for (const gpu::kv_rows& kv : rows_host)
    work += 32 * kv.num_positions * 2 * q_dim;
  parallel_for_if_worth(pool_, work, rows_host.size() * s.num_heads, attend_pairs);
}

void cpu_backend::mla_attention(const float* q, std::span<const gpu::kv_rows> rows_host, const gpu::mla_shape& s,
                                float* out) {
  auto attend_pairs = [&](std::size_t begin, std::size_t end) {  // as attention(): (row, head) tasks
    for_row_heads(rows_host, s.num_heads, begin, end, [&](std::size_t t, std::size_t h, std::size_t h_end, float* scores) {
      const gpu::kv_rows& kv = rows_host[t];
      attend_shared_row_heads(q + t * s.num_heads * s.key_dim, kv.keys, s.row_stride, kv.num_positions, s.key_dim,
                              s.value_dim, s.scale, h, h_end, scores, out + t * s.num_heads * s.value_dim);
    });
  };
  std::size_t work = 0;  // as attention()
  for (const gpu::kv_rows& kv : rows_host)
    work += 32 * kv.num_positions * s.num_heads * (s.key_dim + s.value_dim);
  parallel_for_if_worth(pool_, work, rows_host.size() * s.num_heads, attend_pairs);
}

void cpu_backend::route(float* logits, std::size_t num_rows, const gpu::route_params& p,
                        gpu::routed_slot* routes_host) {
  std::size_t num_experts = p.num_experts;
  std::size_t top_k = p.top_k;
  std::size_t num_groups = p.num_groups;
  std::size_t group_size = num_experts / num_groups;
  std::vector<std::int32_t> order(num_experts), groups(num_groups);
  std::vector<float> eligible(num_experts), group_max(num_groups);
  auto by_value = [](const float* v) {
    return [v](std::int32_t a, std::int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); };
  };
  for (std::size_t t = 0; t < num_rows; ++t) {
    float* probs = logits + t * num_experts;
    softmax(probs, num_experts);
    std::copy_n(probs, num_experts, eligible.begin());
    if (num_groups > 1) {
      // The other groups' probabilities read as 0 for the selection (DeepSeek's masked_fill).
      for (std::size_t g = 0; g < num_groups; ++g) {
        group_max[g] = *std::max_element(probs + g * group_size, probs + (g + 1) * group_size);
        groups[g] = std::int32_t(g);
      }
      std::size_t keep = p.topk_group;
      std::partial_sort(groups.begin(), groups.begin() + std::ptrdiff_t(keep), groups.end(),
                        by_value(group_max.data()));
      for (std::size_t i = keep; i < num_groups; ++i)
        std::fill_n(eligible.begin() + std::ptrdiff_t(std::size_t(groups[i]) * group_size), group_size, 0.0f);
    }
    for (std::size_t e = 0; e < num_experts; ++e)
      order[e] = std::int32_t(e);
    std::partial_sort(order.begin(), order.begin() + std::ptrdiff_t(top_k), order.end(), by_value(eligible.data()));
    gpu::routed_slot* r = routes_host + t * top_k;
    float sum = 0.0f;
    for (std::size_t s = 0; s < top_k; ++s) {
      r[s] = {order[s], probs[order[s]]};
      sum += r[s].weight;
    }
    for (std::size_t s = 0; s < top_k; ++s)
      r[s].weight = (p.renormalize ? r[s].weight / sum : r[s].weight) * p.scaling;
    // The combine sums in slot order: expert-index order, never rank or arrival (DESIGN.md §4).
    std::sort(r, r + top_k, [](const gpu::routed_slot& a, const gpu::routed_slot& b) { return a.expert < b.expert; });
  }
}

void cpu_backend::swiglu(const float* gate_up, std::size_t num_rows, std::size_t dim, float* out) {
  for (std::size_t r = 0; r < num_rows; ++r) {
    const float* g = gate_up + r * 2 * dim;
    silu_mul(g, g + dim, dim, out + r * dim);
  }
}

void cpu_backend::sigmoid_gate(const float* gate, std::size_t num_rows, std::size_t dim, float* x) {
  for (std::size_t t = 0; t < num_rows; ++t) {
    float g = 1.0f / (1.0f + std::exp(-gate[t]));
    for (std::size_t i = 0; i < dim; ++i)
      x[t * dim + i] = g * x[t * dim + i];
  }
}

void cpu_backend::add(float* x, const float* y, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i)
    x[i] += y[i];
}

void cpu_backend::gather_rows(const float* const* src_rows_host, std::size_t num_rows, std::size_t dim, float* dst) {
  for (std::size_t r = 0; r < num_rows; ++r)
    std::copy_n(src_rows_host[r], dim, dst + r * dim);
}

void cpu_backend::scatter_rows(const float* src, std::size_t src_stride, std::size_t num_rows, std::size_t dim,
                               float* const* dst_rows_host) {
  for (std::size_t r = 0; r < num_rows; ++r)
    std::copy_n(src + r * src_stride, dim, dst_rows_host[r]);
}

void cpu_backend::copy_rows(const float* src, std::size_t src_stride, float* dst, std::size_t dst_stride,
                            std::size_t num_rows, std::size_t dim) {
  for (std::size_t r = 0; r < num_rows; ++r)
    std::copy_n(src + r * src_stride, dim, dst + r * dst_stride);
}

void cpu_backend::weight_rows(const float* x, std::size_t num_rows, std::size_t dim, const float* weights_host,
                              float* const* out_rows_host) {
  for (std::size_t r = 0; r < num_rows; ++r) {
    const float* y = x + r * dim;
    float* out = out_rows_host[r];
    for (std::size_t i = 0; i < dim; ++i)
      out[i] = y[i] * weights_host[r];
  }
}

void cpu_backend::combine(const float* const* weighted_host, std::size_t top_k, const float* side,
                          std::size_t num_rows, std::size_t dim, float* x) {
  std::vector<float> combined(dim);
  for (std::size_t t = 0; t < num_rows; ++t) {
    std::fill(combined.begin(), combined.end(), 0.0f);
    for (std::size_t s = 0; s < top_k; ++s) {
      const float* y = weighted_host[t * top_k + s];
      for (std::size_t i = 0; i < dim; ++i)
        combined[i] += y[i];
    }
    if (side)
      for (std::size_t i = 0; i < dim; ++i)
        combined[i] += side[t * dim + i];
    for (std::size_t i = 0; i < dim; ++i)
      x[t * dim + i] += combined[i];
  }
}

// -- scheduling -------------------------------------------------------------------------------

void cpu_backend::concurrent(std::size_t num_tasks, std::size_t work,
                             const std::function<void(gpu::backend& lane, std::size_t begin, std::size_t end)>& body) {
  // Each range runs single-threaded on its own lane: the pool is busy running the ranges.
  parallel_for_if_worth(pool_, work, num_tasks, [&](std::size_t begin, std::size_t end) {
    cpu_backend lane{static_cast<thread_pool*>(nullptr)};
    body(lane, begin, end);
  });
}

}  // namespace moert::cpu
