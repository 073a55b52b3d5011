#include "model/weights.hpp"

#include "core/rng.hpp"

#include <cmath>
#include <cstddef>
#include <map>
#include <set>
#include <span>

namespace moert::model {

namespace {

using shape_t = std::vector<std::int64_t>;

// One tensor as stored: `count` little-endian elements of `type` at `data` (any alignment).
struct stored_tensor {
  dtype type = dtype::f32;
  const void* data = nullptr;
  std::size_t count = 0;
};

// Where the builder reads tensors. get() checks the shape; its bytes stay valid until
// release(name), which tells the source the builder has copied them and will not read them
// again (a checkpoint then drops the mapped pages, so the file and its packed copy are never
// both resident).
class tensor_source {
public:
  virtual ~tensor_source() = default;
  virtual result<stored_tensor> get(const std::string& name, const shape_t& shape) = 0;
  virtual void release(const std::string& name) = 0;
};

class checkpoint_source final : public tensor_source {
public:
  explicit checkpoint_source(const checkpoint& ck) : ck_(ck) {}
  result<stored_tensor> get(const std::string& name, const shape_t& shape) override {
    auto view = ck_.view(name, shape);
    if (!view)
      return view.err();
    return stored_tensor{(*view)->type, (*view)->data, (*view)->num_elements};
  }
  void release(const std::string& name) override {
    if (const tensor_view* view = ck_.find(name))
      ck_.release(*view);
  }

private:
  const checkpoint& ck_;
};

class synthetic_source final : public tensor_source {
public:
  explicit synthetic_source(std::uint64_t seed) : seed_(seed) {}
  result<stored_tensor> get(const std::string& name, const shape_t& shape) override {
    // Each tensor gets its own stream keyed by its name, so weights do not depend on
    // the order tensors are built in.
    std::uint64_t key = seed_;
    for (char ch : name)
      key = mix64(key ^ std::uint64_t(static_cast<unsigned char>(ch)));
    rng gen{key};
    std::size_t count = 1;
    for (auto dim : shape)
      count *= std::size_t(dim);
    std::vector<float>& values = live_[name];
    values.resize(count);
    bool is_norm = shape.size() == 1 && name.find("norm") != std::string::npos;
    bool is_embedding = name == "model.embed_tokens.weight";
    float scale = is_embedding ? 1.0f : shape.size() == 2 ? 1.0f / std::sqrt(float(shape[1])) : 0.1f;
    for (auto& v : values)
      v = is_norm ? gen.uniform(0.8f, 1.2f) : gen.uniform(-scale, scale);
    return stored_tensor{dtype::f32, values.data(), count};
  }
  void release(const std::string& name) override { live_.erase(name); }

private:
  std::uint64_t seed_;
  std::map<std::string, std::vector<float>> live_;
};

// Builds the compute layout from any tensor source, so checkpoints and synthetic weights
// share one path (and the synthetic default exercises the real naming and shapes).
class builder {
public:
  builder(const model_config& config, tensor_source& source, const load_options& options, gpu::backend& backend)
      : config_(config), source_(source), options_(options), backend_(backend) {}

  result<model_weights> build() {
    const model_config& c = config_;
    std::int64_t h = c.hidden_size;
    model_weights out;
    out.layers.resize(std::size_t(c.num_layers));
    if (!options_.attention_side) {  // an expert node: the routed experts only
      for (std::int64_t i = 0; i < c.num_layers; ++i)
        MOERT_TRY(build_experts(i, out.layers[std::size_t(i)]));
      return out;
    }
    MOERT_TRY(fetch("model.embed_tokens.weight", {c.vocab_size, h}, out.embedding));
    for (std::int64_t i = 0; i < c.num_layers; ++i)
      MOERT_TRY(build_layer(i, out.layers[std::size_t(i)]));
    MOERT_TRY(fetch("model.norm.weight", {h}, out.final_norm));
    // Tied: packed again from the stored embedding, so lm_head keeps the stored type.
    MOERT_TRY(fetch_matrix(c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight",
                           c.vocab_size, h, out.lm_head));
    return out;
  }

  const std::set<std::string>& used() const { return used_; }

private:
  result<stored_tensor> get(const std::string& name, const shape_t& shape) {
    auto t = source_.get(name, shape);
    if (t)
      used_.insert(name);
    return t;
  }

  // Vectors (norms, biases, the embedding table) are read as f32.
  status fetch(const std::string& name, const shape_t& shape, gpu::buffer& out) {
    auto t = get(name, shape);
    if (!t)
      return t.err();
    out = backend_.allocate(t->count * sizeof(float));
    if (t->count != 0) {
      if (backend_.shares_memory_with(gpu::host_backend())) {  // host memory: convert in place
        convert_to_f32(t->type, t->data, t->count, out.floats());
      } else {
        std::vector<float> host(t->count);
        convert_to_f32(t->type, t->data, t->count, host.data());
        backend_.upload(out.data(), host.data(), host.size() * sizeof(float));
      }
    }
    source_.release(name);
    return {};
  }

  status upload(const std::string& name, dtype type, std::size_t cols, std::span<const gpu::matrix_part> parts,
                gpu::matrix& out) {
    auto m = backend_.upload_matrix(type, cols, parts);
    if (!m)
      return make_error(m.err().code, "tensor '" + name + "': " + m.err().message);
    out = std::move(m.value());
    return {};
  }

  // The type a matrix made of these parts is held in: the parts' own when they agree and
  // the options allow it, f32 otherwise (widening is exact, so the bits of results are the
  // same either way; only the bytes held and streamed differ).
  dtype storage_type(std::span<const gpu::matrix_part> parts, bool keep_stored) const {
    if (!keep_stored || options_.upcast_to_f32 || parts.empty())
      return dtype::f32;
    for (const auto& part : parts)
      if (part.type != parts.front().type)
        return dtype::f32;
    return parts.front().type;
  }

  // `keep_stored` false holds the matrix in f32 whatever the checkpoint stores: the router
  // and the shared-expert gate, which are tiny and whose precision stays as it always was.
  status fetch_matrix(const std::string& name, std::int64_t rows, std::int64_t cols,
                      gpu::matrix& out, bool keep_stored = true) {
    auto t = get(name, {rows, cols});
    if (!t)
      return t.err();
    const gpu::matrix_part part{t->data, t->type, std::size_t(rows), std::size_t(cols)};
    MOERT_TRY(upload(name, storage_type(std::span{&part, 1}, keep_stored), std::size_t(cols), std::span{&part, 1}, out));
    source_.release(name);
    return {};
  }

  status fetch_linear(const std::string& prefix, std::int64_t rows, std::int64_t cols, bool bias,
                      linear_weights& out) {
    MOERT_TRY(fetch_matrix(prefix + ".weight", rows, cols, out.weight));
    if (bias)
      MOERT_TRY(fetch(prefix + ".bias", {rows}, out.bias));
    return {};
  }

  // q_proj, k_proj and v_proj under `prefix` packed straight from their stored bytes into one
  // matrix (attention_weights::qkv), their biases into one buffer.
  status fetch_qkv(const std::string& prefix, linear_weights& out) {
    const model_config& c = config_;
    const std::size_t cols = std::size_t(c.hidden_size);
    const std::string keys[] = {prefix + ".q_proj", prefix + ".k_proj", prefix + ".v_proj"};
    const std::size_t rows[] = {std::size_t(c.q_dim()), std::size_t(c.kv_dim()), std::size_t(c.kv_dim())};
    gpu::matrix_part parts[3]{};
    for (std::size_t i = 0; i < 3; ++i) {
      auto t = get(keys[i] + ".weight", {std::int64_t(rows[i]), std::int64_t(cols)});
      if (!t)
        return t.err();
      parts[i] = {t->data, t->type, rows[i], cols};
    }
    MOERT_TRY(upload(keys[0] + ".weight", storage_type(parts, true), cols, parts, out.weight));
    for (const auto& key : keys)
      source_.release(key + ".weight");
    if (!c.qkv_bias)
      return {};
    std::vector<float> bias(rows[0] + rows[1] + rows[2]);
    std::size_t at = 0;
    for (std::size_t i = 0; i < 3; ++i) {
      auto t = get(keys[i] + ".bias", {std::int64_t(rows[i])});
      if (!t)
        return t.err();
      convert_to_f32(t->type, t->data, t->count, bias.data() + at);
      at += rows[i];
      source_.release(keys[i] + ".bias");
    }
    out.bias = backend_.upload_floats(bias);
    return {};
  }

  // gate/up/down under `prefix` with the given projection names; gate and up are packed
  // straight from their stored bytes into one matrix.
  status fetch_mlp(const std::string& prefix, std::int64_t intermediate, const char* gate_name,
                   const char* up_name, const char* down_name, mlp_weights& out) {
    std::int64_t h = config_.hidden_size;
    const std::string gate_key = prefix + "." + gate_name + ".weight";
    const std::string up_key = prefix + "." + up_name + ".weight";
    auto gate = get(gate_key, {intermediate, h});
    if (!gate)
      return gate.err();
    auto up = get(up_key, {intermediate, h});
    if (!up)
      return up.err();
    const auto rows = std::size_t(intermediate), cols = std::size_t(h);
    const gpu::matrix_part parts[] = {{gate->data, gate->type, rows, cols},
                                      {up->data, up->type, rows, cols}};
    MOERT_TRY(upload(gate_key, storage_type(parts, true), cols, parts, out.gate_up));
    source_.release(gate_key);
    source_.release(up_key);
    return fetch_matrix(prefix + "." + down_name + ".weight", h, intermediate, out.down);
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
      MOERT_TRY(fetch_qkv(ap, a.qkv));
      MOERT_TRY(fetch_linear(ap + ".o_proj", h, c.q_dim(), c.o_bias, a.o));
    }
    if (c.qk_norm) {
      MOERT_TRY(fetch(ap + ".q_norm.weight", {c.head_dim}, a.q_norm));
      MOERT_TRY(fetch(ap + ".k_norm.weight", {c.head_dim}, a.k_norm));
    }

    if (!c.sparse_layers[std::size_t(idx)])
      return fetch_mlp(p + ".mlp", c.intermediate_size, "gate_proj", "up_proj", "down_proj",
                       layer.dense_mlp);

    std::string mp = moe_prefix(idx);
    MOERT_TRY(fetch_matrix(mp + ".gate.weight", c.num_experts, h, layer.router, false));
    MOERT_TRY(build_experts(idx, layer));
    if (c.shared_expert_intermediate_size > 0)
      MOERT_TRY(fetch_mlp(mp + (c.mla() ? ".shared_experts" : ".shared_expert"),
                          c.shared_expert_intermediate_size, "gate_proj", "up_proj", "down_proj",
                          layer.shared_expert));
    if (c.shared_expert_gated)
      MOERT_TRY(fetch_matrix(mp + ".shared_expert_gate.weight", 1, h, layer.shared_expert_gate, false));
    return {};
  }

  std::string moe_prefix(std::int64_t idx) const {
    return "model.layers." + std::to_string(idx) + (config_.arch == architecture::mixtral ? ".block_sparse_moe" : ".mlp");
  }

  // The routed experts of a sparse layer that the options keep (the others stay empty).
  status build_experts(std::int64_t idx, layer_weights& layer) {
    const model_config& c = config_;
    if (!c.sparse_layers[std::size_t(idx)])
      return {};
    std::string mp = moe_prefix(idx);
    bool mixtral = c.arch == architecture::mixtral;
    layer.experts.resize(std::size_t(c.num_experts));
    for (std::int64_t e = 0; e < c.num_experts; ++e) {
      if (options_.keep_expert && !options_.keep_expert(std::size_t(e)))
        continue;
      std::string ep = mp + ".experts." + std::to_string(e);
      auto& expert = layer.experts[std::size_t(e)];
      if (mixtral)
        MOERT_TRY(fetch_mlp(ep, c.moe_intermediate_size, "w1", "w3", "w2", expert));
      else
        MOERT_TRY(fetch_mlp(ep, c.moe_intermediate_size, "gate_proj", "up_proj", "down_proj", expert));
    }
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
    const std::string kv_b_key = ap + ".kv_b_proj.weight";
    auto kv_b = get(kv_b_key, {c.num_heads * std::int64_t(nope + v_dim), c.kv_lora_rank});
    if (!kv_b)
      return kv_b.err();
    const std::size_t elem = size_of(kv_b->type);
    for (std::size_t head = 0; head < std::size_t(c.num_heads); ++head) {
      const auto* w_uk = static_cast<const std::byte*>(kv_b->data) + head * (nope + v_dim) * rank * elem;
      // k_absorb = W_UKᵀ: row j (a latent dimension) reads column j of W_UK.
      const gpu::matrix_part k_t{w_uk, kv_b->type, rank, 1, rank};
      MOERT_TRY(upload(kv_b_key, storage_type(std::span{&k_t, 1}, true), nope, std::span{&k_t, 1},
                       a.k_absorb.emplace_back()));
      const gpu::matrix_part w_uv{w_uk + nope * rank * elem, kv_b->type, v_dim, rank};
      MOERT_TRY(upload(kv_b_key, storage_type(std::span{&w_uv, 1}, true), rank, std::span{&w_uv, 1},
                       a.v_up.emplace_back()));
    }
    source_.release(kv_b_key);
    return {};
  }

  const model_config& config_;
  tensor_source& source_;
  const load_options& options_;
  gpu::backend& backend_;
  std::set<std::string> used_;
};

}  // namespace

result<model_weights> load_weights(const model_config& config, const checkpoint& source,
                                   const load_options& options, gpu::backend& backend) {
  checkpoint_source src{source};
  builder b{config, src, options, backend};
  auto weights = b.build();
  if (!weights)
    return weights.err();
  bool whole = options.attention_side && !options.keep_expert;  // a part leaves the rest unread
  for (const auto& [name, view] : source.tensors())
    if (whole && !b.used().count(name))
      weights->unexpected_tensors.push_back(name);
  return weights;
}

result<loaded_checkpoint> load_checkpoint(const std::filesystem::path& dir, const load_options& options,
                                          gpu::backend& backend) {
  auto config = load_config(dir);
  if (!config)
    return config.err();
  auto source = checkpoint::open(dir);
  if (!source)
    return source.err();
  auto weights = load_weights(*config, *source, options, backend);
  if (!weights)
    return weights.err();
  return loaded_checkpoint{std::move(config.value()), std::move(weights.value())};
}

model_weights synthetic_weights(const model_config& config, std::uint64_t seed, gpu::backend& backend) {
  synthetic_source src{seed};
  const load_options options;
  builder b{config, src, options, backend};
  return std::move(b.build().value());
}

result<model_weights> synthetic_weights(const model_config& config, std::uint64_t seed, gpu::backend& backend,
                                        const load_options& options) {
  synthetic_source src{seed};
  builder b{config, src, options, backend};
  return b.build();
}

namespace {

void count(const gpu::matrix& m, weight_bytes& out) {
  (m.type() == dtype::f32 ? out.f32 : m.type() == dtype::bf16 ? out.bf16 : out.f16) += m.num_bytes();
}
void count(const gpu::buffer& v, weight_bytes& out) {
  out.f32 += v.num_bytes();
}
void count(const mlp_weights& m, weight_bytes& out) {
  count(m.gate_up, out);
  count(m.down, out);
}
void count(const linear_weights& l, weight_bytes& out) {
  count(l.weight, out);
  count(l.bias, out);
}

}  // namespace

weight_bytes resident_bytes(const model_weights& w) {
  weight_bytes out;
  count(w.embedding, out);
  count(w.final_norm, out);
  count(w.lm_head, out);
  for (const auto& layer : w.layers) {
    count(layer.input_norm, out);
    count(layer.post_attention_norm, out);
    const auto& a = layer.attention;
    for (const auto* l : {&a.qkv, &a.q, &a.o, &a.q_a, &a.q_b, &a.kv_a})
      count(*l, out);
    for (const auto* v : {&a.q_norm, &a.k_norm, &a.q_a_norm, &a.kv_a_norm})
      count(*v, out);
    for (const auto& m : a.k_absorb)
      count(m, out);
    for (const auto& m : a.v_up)
      count(m, out);
    count(layer.router, out);
    for (const auto& e : layer.experts)
      count(e, out);
    count(layer.shared_expert, out);
    count(layer.shared_expert_gate, out);
    count(layer.dense_mlp, out);
  }
  return out;
}

}  // namespace moert::model
