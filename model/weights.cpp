#include "model/weights.hpp"

#include "core/rng.hpp"

#include <cmath>
#include <functional>
#include <set>

namespace moert::model {

namespace {

using shape_t = std::vector<std::int64_t>;
// Produces the f32 values of one named tensor of the given shape.
using tensor_source = std::function<result<std::vector<float>>(const std::string&, const shape_t&)>;

// Builds the compute layout from any tensor source, so checkpoints and synthetic weights
// share one path (and the synthetic default exercises the real naming and shapes).
class builder {
public:
  builder(const model_config& config, tensor_source source)
      : config_(config), source_(std::move(source)) {}

  result<model_weights> build() {
    const model_config& c = config_;
    std::int64_t h = c.hidden_size;
    model_weights out;
    MOERT_TRY(fetch("model.embed_tokens.weight", {c.vocab_size, h}, out.embedding));
    out.layers.resize(std::size_t(c.num_layers));
    for (std::int64_t i = 0; i < c.num_layers; ++i)
      MOERT_TRY(build_layer(i, out.layers[std::size_t(i)]));
    MOERT_TRY(fetch("model.norm.weight", {h}, out.final_norm));
    if (c.tie_word_embeddings) {
      out.lm_head = cpu::packed_matrix::pack(out.embedding.data(), std::size_t(c.vocab_size),
                                             std::size_t(h));
    } else {
      MOERT_TRY(fetch_matrix("lm_head.weight", c.vocab_size, h, out.lm_head));
    }
    return out;
  }

  const std::set<std::string>& used() const { return used_; }

private:
  status fetch(const std::string& name, const shape_t& shape, std::vector<float>& out) {
    auto values = source_(name, shape);
    if (!values)
      return values.err();
    used_.insert(name);
    out = std::move(values.value());
    return {};
  }

  status fetch_matrix(const std::string& name, std::int64_t rows, std::int64_t cols,
                      cpu::packed_matrix& out) {
    std::vector<float> values;
    MOERT_TRY(fetch(name, {rows, cols}, values));
    out = cpu::packed_matrix::pack(values.data(), std::size_t(rows), std::size_t(cols));
    return {};
  }

  status fetch_linear(const std::string& prefix, std::int64_t rows, std::int64_t cols, bool bias,
                      linear_weights& out) {
    MOERT_TRY(fetch_matrix(prefix + ".weight", rows, cols, out.weight));
    if (bias)
      MOERT_TRY(fetch(prefix + ".bias", {rows}, out.bias));
    return {};
  }

  // gate/up/down under `prefix` with the given projection names.
  status fetch_mlp(const std::string& prefix, std::int64_t intermediate, const char* gate_name,
                   const char* up_name, const char* down_name, mlp_weights& out) {
    std::int64_t h = config_.hidden_size;
    std::vector<float> gate, up, down;
    MOERT_TRY(fetch(prefix + "." + gate_name + ".weight", {intermediate, h}, gate));
    MOERT_TRY(fetch(prefix + "." + up_name + ".weight", {intermediate, h}, up));
    MOERT_TRY(fetch(prefix + "." + down_name + ".weight", {h, intermediate}, down));
    gate.insert(gate.end(), up.begin(), up.end());
    out.gate_up = cpu::packed_matrix::pack(gate.data(), std::size_t(2 * intermediate), std::size_t(h));
    out.down = cpu::packed_matrix::pack(down.data(), std::size_t(h), std::size_t(intermediate));
    return {};
  }

  status build_layer(std::int64_t idx, layer_weights& layer) {
    const model_config& c = config_;
    std::int64_t h = c.hidden_size;
    std::string p = "model.layers." + std::to_string(idx);
    MOERT_TRY(fetch(p + ".input_layernorm.weight", {h}, layer.input_norm));
    MOERT_TRY(fetch(p + ".post_attention_layernorm.weight", {h}, layer.post_attention_norm));

    attention_weights& a = layer.attention;
    std::string ap = p + ".self_attn";
    if (c.mla()) {
      MOERT_TRY(build_mla(ap, a));
    } else {
      MOERT_TRY(fetch_linear(ap + ".q_proj", c.q_dim(), h, c.qkv_bias, a.q));
      MOERT_TRY(fetch_linear(ap + ".k_proj", c.kv_dim(), h, c.qkv_bias, a.k));
      MOERT_TRY(fetch_linear(ap + ".v_proj", c.kv_dim(), h, c.qkv_bias, a.v));
      MOERT_TRY(fetch_linear(ap + ".o_proj", h, c.q_dim(), c.o_bias, a.o));
    }
    if (c.qk_norm) {
      MOERT_TRY(fetch(ap + ".q_norm.weight", {c.head_dim}, a.q_norm));
      MOERT_TRY(fetch(ap + ".k_norm.weight", {c.head_dim}, a.k_norm));
    }

    if (!c.sparse_layers[std::size_t(idx)])
      return fetch_mlp(p + ".mlp", c.intermediate_size, "gate_proj", "up_proj", "down_proj",
                       layer.dense_mlp);

    bool mixtral = c.arch == architecture::mixtral;
    std::string mp = p + (mixtral ? ".block_sparse_moe" : ".mlp");
    MOERT_TRY(fetch_matrix(mp + ".gate.weight", c.num_experts, h, layer.router));
    layer.experts.resize(std::size_t(c.num_experts));
    for (std::int64_t e = 0; e < c.num_experts; ++e) {
      std::string ep = mp + ".experts." + std::to_string(e);
      auto& expert = layer.experts[std::size_t(e)];
      if (mixtral)
        MOERT_TRY(fetch_mlp(ep, c.moe_intermediate_size, "w1", "w3", "w2", expert));
      else
        MOERT_TRY(fetch_mlp(ep, c.moe_intermediate_size, "gate_proj", "up_proj", "down_proj", expert));
    }
    if (c.shared_expert_intermediate_size > 0)
      MOERT_TRY(fetch_mlp(mp + (c.mla() ? ".shared_experts" : ".shared_expert"),
                          c.shared_expert_intermediate_size, "gate_proj", "up_proj", "down_proj",
                          layer.shared_expert));
    if (c.shared_expert_gated)
      MOERT_TRY(fetch_matrix(mp + ".shared_expert_gate.weight", 1, h, layer.shared_expert_gate));
    return {};
  }

  status build_mla(const std::string& ap, attention_weights& a) {
    const model_config& c = config_;
    std::int64_t h = c.hidden_size;
    if (c.q_lora_rank > 0) {
      MOERT_TRY(fetch_linear(ap + ".q_a_proj", c.q_lora_rank, h, false, a.q_a));
      MOERT_TRY(fetch(ap + ".q_a_layernorm.weight", {c.q_lora_rank}, a.q_a_norm));
      MOERT_TRY(fetch_linear(ap + ".q_b_proj", c.q_dim(), c.q_lora_rank, false, a.q_b));
    } else {
      MOERT_TRY(fetch_linear(ap + ".q_proj", c.q_dim(), h, false, a.q));
    }
    MOERT_TRY(fetch_linear(ap + ".kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, h, false,
                           a.kv_a));
    MOERT_TRY(fetch(ap + ".kv_a_layernorm.weight", {c.kv_lora_rank}, a.kv_a_norm));
    MOERT_TRY(fetch_linear(ap + ".o_proj", h, c.num_heads * c.v_head_dim, false, a.o));

    // kv_b_proj rows, per head: qk_nope_head_dim of W_UK, then v_head_dim of W_UV.
    std::size_t rank = std::size_t(c.kv_lora_rank), nope = std::size_t(c.qk_nope_head_dim);
    std::size_t v_dim = std::size_t(c.v_head_dim);
    std::vector<float> kv_b, k_t(rank * nope);
    MOERT_TRY(fetch(ap + ".kv_b_proj.weight", {c.num_heads * std::int64_t(nope + v_dim), c.kv_lora_rank},
                    kv_b));
    for (std::size_t head = 0; head < std::size_t(c.num_heads); ++head) {
      const float* w_uk = kv_b.data() + head * (nope + v_dim) * rank;
      for (std::size_t d = 0; d < nope; ++d)
        for (std::size_t j = 0; j < rank; ++j)
          k_t[j * nope + d] = w_uk[d * rank + j];
      a.k_absorb.push_back(cpu::packed_matrix::pack(k_t.data(), rank, nope));
      a.v_up.push_back(cpu::packed_matrix::pack(w_uk + nope * rank, v_dim, rank));
    }
    return {};
  }

  const model_config& config_;
  tensor_source source_;
  std::set<std::string> used_;
};

}  // namespace

result<model_weights> load_weights(const model_config& config, const checkpoint& source) {
  builder b{config, [&](const std::string& name, const shape_t& shape) {
              return source.read_f32(name, shape);
            }};
  auto weights = b.build();
  if (!weights)
    return weights.err();
  for (const auto& [name, view] : source.tensors())
    if (!b.used().count(name))
      weights->unexpected_tensors.push_back(name);
  return weights;
}

result<loaded_checkpoint> load_checkpoint(const std::filesystem::path& dir) {
  auto config = load_config(dir);
  if (!config)
    return config.err();
  auto source = checkpoint::open(dir);
  if (!source)
    return source.err();
  auto weights = load_weights(*config, *source);
  if (!weights)
    return weights.err();
  return loaded_checkpoint{std::move(config.value()), std::move(weights.value())};
}

model_weights synthetic_weights(const model_config& config, std::uint64_t seed) {
  builder b{config, [seed](const std::string& name, const shape_t& shape) -> result<std::vector<float>> {
              // Each tensor gets its own stream keyed by its name, so weights do not depend on
              // the order tensors are built in.
              std::uint64_t key = seed;
              for (char ch : name)
                key = mix64(key ^ std::uint64_t(static_cast<unsigned char>(ch)));
              rng gen{key};
              std::size_t count = 1;
              for (auto dim : shape)
                count *= std::size_t(dim);
              std::vector<float> values(count);
              bool is_norm = shape.size() == 1 && name.find("norm") != std::string::npos;
              bool is_embedding = name == "model.embed_tokens.weight";
              float scale = is_embedding ? 1.0f
                            : shape.size() == 2 ? 1.0f / std::sqrt(float(shape[1]))
                                                : 0.1f;
              for (auto& v : values)
                v = is_norm ? gen.uniform(0.8f, 1.2f) : gen.uniform(-scale, scale);
              return values;
            }};
  return std::move(b.build().value());
}

}  // namespace moert::model
