#pragma once

// The weights of one model in compute layout, resident on one backend (gpu/backend.hpp):
// linear layers are backend matrices uploaded in the checkpoint's own type (f32, bf16 or f16;
// the cpu backend widens 16-bit weights in registers, exactly, so results are the bits of the
// f32 upcast), an expert's gate and up projections fused into one matrix so a single pass
// produces both. Vectors (norms, biases) and the embedding table are f32 backend buffers; the
// router and the shared-expert gate are f32 matrices. Loading uploads tensor by tensor and
// drops each one's mapped pages once copied, so the checkpoint file and its device copy are
// never both resident.
//
// Ownership: model_weights owns every buffer and matrix (their memory belongs to the backend
// they were loaded on; by default gpu::host_backend(), which every cpu backend shares). It is
// immutable once loaded and may be read from any thread.

#include "core/error.hpp"
#include "gpu/backend.hpp"
#include "gpu/registry.hpp"
#include "model/config.hpp"
#include "model/safetensors.hpp"

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace moert::model {

struct linear_weights {
  gpu::matrix weight;  // [out, in]
  gpu::buffer bias;    // out floats; empty when the layer has none
};

// A SwiGLU MLP: down(silu(gate(x)) · up(x)). gate_up rows [0, I) are gate, [I, 2I) up.
struct mlp_weights {
  gpu::matrix gate_up;
  gpu::matrix down;
  std::int64_t intermediate_size() const { return std::int64_t(down.cols()); }
};

struct attention_weights {
  // Standard attention: q_proj, k_proj and v_proj fused into one matrix (rows [0, q_dim) q,
  // then kv_dim of k, then kv_dim of v; the bias likewise), so one matmul, one pass over the
  // weights and one thread-pool dispatch produce all three. Every output column is computed
  // on its own, so the bits are those of three separate matmuls.
  linear_weights qkv, o;
  gpu::buffer q_norm, k_norm;  // per-head RMSNorm weights (qwen3), else empty

  // MLA (deepseek_v2); qkv is unused.
  linear_weights q;            // q_proj when q_lora_rank is 0
  linear_weights q_a, q_b;     // q_b(q_a_layernorm(q_a(x))) when q_lora_rank > 0
  gpu::buffer q_a_norm;
  linear_weights kv_a;         // kv_a_proj_with_mqa: [kv_lora_rank + qk_rope_head_dim, hidden]
  gpu::buffer kv_a_norm;
  // kv_b_proj split per head and absorbed, so attention runs on the compressed cache:
  // k_absorb[h] = W_UK_hᵀ [kv_lora_rank, qk_nope_head_dim] maps q_nope into the latent space,
  // v_up[h] = W_UV_h [v_head_dim, kv_lora_rank] maps the attended latent to the head output.
  std::vector<gpu::matrix> k_absorb, v_up;
};

struct layer_weights {
  gpu::buffer input_norm;
  gpu::buffer post_attention_norm;
  attention_weights attention;
  // Sparse layers: router, experts and optional shared expert. Dense layers: dense_mlp.
  gpu::matrix router;  // [num_experts, hidden]
  std::vector<mlp_weights> experts;
  mlp_weights shared_expert;             // empty (0 columns) when absent
  gpu::matrix shared_expert_gate;  // [1, hidden], when shared_expert_gated
  mlp_weights dense_mlp;
};

struct model_weights {
  gpu::buffer embedding;  // [vocab, hidden] floats, row per token id
  std::vector<layer_weights> layers;
  gpu::buffer final_norm;
  gpu::matrix lm_head;  // [vocab, hidden]; a matrix copy of the embedding when tied
  // Tensors found in the checkpoint that this architecture does not use.
  std::vector<std::string> unexpected_tensors;
};

struct load_options {
  // Hold every matrix as f32 (what the loader did before 16-bit weights were kept): twice
  // the bytes of a bf16 checkpoint, the same output bits. For tests and comparisons.
  bool upcast_to_f32 = false;
  // A cluster node loads only its part (the other tensors are neither read nor validated, and
  // their matrices stay empty). attention_side: embedding, attention, norms, router, dense and
  // shared experts, lm_head. keep_expert: which routed experts (unset: all).
  bool attention_side = true;
  std::function<bool(std::size_t expert)> keep_expert;
};

// Loads and validates every tensor the architecture needs: each must be present with the
// expected shape (errors name the tensor and file). Unused tensors are listed, not fatal.
// Drops the resident pages of each tensor of `source` once it is copied (checkpoint::release).
// Buffers and matrices are uploaded to `backend` (only what `options` keeps, so an expert
// device holds only its experts).
result<model_weights> load_weights(const model_config& config, const checkpoint& source,
                                   const load_options& options = {},
                                   gpu::backend& backend = gpu::host_backend());

// A Hugging Face checkpoint directory read whole: config.json, then every weight it needs.
struct loaded_checkpoint {
  model_config config;
  model_weights weights;
};
result<loaded_checkpoint> load_checkpoint(const std::filesystem::path& dir,
                                          const load_options& options = {},
                                          gpu::backend& backend = gpu::host_backend());

// Bytes of weights held in memory, by the type they are held in.
struct weight_bytes {
  std::size_t f32 = 0;
  std::size_t bf16 = 0;
  std::size_t f16 = 0;
  std::size_t total() const { return f32 + bf16 + f16; }
};
weight_bytes resident_bytes(const model_weights& weights);

// Seeded random weights for `config` (uniform, scaled by 1/sqrt(fan_in); norms near 1).
// The same (config, seed) always gives the same bits.
model_weights synthetic_weights(const model_config& config, std::uint64_t seed,
                                gpu::backend& backend = gpu::host_backend());
// Only the part `options` keeps (a device's part), the same bits as the whole model's.
result<model_weights> synthetic_weights(const model_config& config, std::uint64_t seed, gpu::backend& backend,
                                        const load_options& options);

}  // namespace moert::model
