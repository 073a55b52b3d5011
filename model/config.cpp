#include "model/config.hpp"

#include <nlohmann/json.hpp>

#include <fstream>
#include <set>
#include <sstream>

namespace moert::model {

namespace {

using json = nlohmann::json;

// Reads typed fields of one config object; the first problem found is kept and named.
class field_reader {
public:
  field_reader(const json& root, std::string source) : root_(root), source_(std::move(source)) {}

  bool failed() const { return failed_; }
  const std::string& message() const { return message_; }
  error take_error() const { return make_error(error_code::invalid_config, message_); }

  void fail(const std::string& message) {
    if (!failed_) {
      failed_ = true;
      message_ = source_ + ": " + message;
    }
  }

  bool has(const char* key) const { return root_.contains(key) && !root_[key].is_null(); }

  std::int64_t positive_int(const char* key) {
    if (!has(key)) {
      fail("missing required field '" + std::string{key} + "'");
      return 1;
    }
    return checked_positive(key, root_[key]);
  }

  std::int64_t positive_int_or(const char* key, std::int64_t fallback) {
    return has(key) ? checked_positive(key, root_[key]) : fallback;
  }

  // Like positive_int_or, but 0 is allowed.
  std::int64_t count_or(const char* key, std::int64_t fallback) {
    if (has(key) && root_[key].is_number_integer() && root_[key].get<std::int64_t>() == 0)
      return 0;
    return positive_int_or(key, fallback);
  }

  double positive_number_or(const char* key, double fallback) { return number_or(key, fallback, false); }
  double non_negative_number_or(const char* key, double fallback) { return number_or(key, fallback, true); }

  bool boolean_or(const char* key, bool fallback) {
    if (!has(key))
      return fallback;
    if (!root_[key].is_boolean()) {
      fail("field '" + std::string{key} + "' must be true or false, got " + root_[key].dump());
      return fallback;
    }
    return root_[key].get<bool>();
  }

  std::string string_or(const char* key, const std::string& fallback) {
    if (!has(key))
      return fallback;
    if (!root_[key].is_string()) {
      fail("field '" + std::string{key} + "' must be a string, got " + root_[key].dump());
      return fallback;
    }
    return root_[key].get<std::string>();
  }

  std::vector<std::int64_t> int_list_or_empty(const char* key) {
    std::vector<std::int64_t> out;
    if (!has(key))
      return out;
    if (!root_[key].is_array()) {
      fail("field '" + std::string{key} + "' must be a list of integers");
      return out;
    }
    for (const json& item : root_[key]) {
      if (!item.is_number_integer()) {
        fail("field '" + std::string{key} + "' must be a list of integers, got " + item.dump());
        return {};
      }
      out.push_back(item.get<std::int64_t>());
    }
    return out;
  }

  const json& root() const { return root_; }

private:
  double number_or(const char* key, double fallback, bool zero_ok) {
    if (!has(key))
      return fallback;
    const json& value = root_[key];
    if (!value.is_number() || !(value.get<double>() > 0.0 || (zero_ok && value.get<double>() == 0.0))) {
      fail("field '" + std::string{key} + "' must be a " + (zero_ok ? "non-negative" : "positive") +
           " number, got " + value.dump());
      return fallback;
    }
    return value.get<double>();
  }

  std::int64_t checked_positive(const char* key, const json& value) {
    if (!value.is_number_integer() || value.get<std::int64_t>() <= 0) {
      fail("field '" + std::string{key} + "' must be a positive integer, got " + value.dump());
      return 1;
    }
    // Bound every size so products of a few of them cannot overflow int64.
    if (value.get<std::int64_t>() > (std::int64_t{1} << 24)) {
      fail("field '" + std::string{key} + "' is implausibly large: " + value.dump());
      return 1;
    }
    return value.get<std::int64_t>();
  }

  const json& root_;
  std::string source_;
  bool failed_ = false;
  std::string message_;
};

// eos_token_id: an int, a list of ints, or null/absent (no EOS).
void read_eos(field_reader& in, model_config& config) {
  if (!in.has("eos_token_id"))
    return;
  const json& value = in.root()["eos_token_id"];
  std::vector<std::int64_t> ids;
  if (value.is_number_integer())
    ids.push_back(value.get<std::int64_t>());
  else if (value.is_array())
    ids = in.int_list_or_empty("eos_token_id");
  else
    return in.fail("field 'eos_token_id' must be an integer or a list of integers, got " + value.dump());
  // An id outside the vocabulary can never be generated: it is dropped rather than making
  // an otherwise valid checkpoint unloadable.
  for (std::int64_t id : ids)
    if (id >= 0 && id < config.vocab_size)
      config.eos_token_ids.push_back(std::int32_t(id));
}

void read_common(field_reader& in, model_config& config) {
  config.vocab_size = in.positive_int("vocab_size");
  config.hidden_size = in.positive_int("hidden_size");
  config.num_layers = in.positive_int("num_hidden_layers");
  config.num_heads = in.positive_int("num_attention_heads");
  config.num_kv_heads = in.positive_int_or("num_key_value_heads", config.num_heads);
  config.head_dim = in.positive_int_or("head_dim", config.hidden_size / config.num_heads);
  config.rms_norm_eps = float(in.positive_number_or("rms_norm_eps", config.rms_norm_eps));
  config.max_position_embeddings = in.positive_int_or("max_position_embeddings", 4096);
  config.num_experts_per_tok = in.positive_int("num_experts_per_tok");
  config.tie_word_embeddings = in.boolean_or("tie_word_embeddings", false);
  read_eos(in, config);

  std::string act = in.string_or("hidden_act", "silu");
  if (act != "silu")
    in.fail("hidden_act '" + act + "' is not supported (only 'silu')");

  // "torch_dtype" (and "dtype" in newer transformers) names the storage type of the weights.
  std::string type_key = in.has("torch_dtype") ? "torch_dtype" : "dtype";
  std::string type = in.string_or(type_key.c_str(), "float32");
  if (type == "float32")
    config.torch_dtype = dtype::f32;
  else if (type == "bfloat16")
    config.torch_dtype = dtype::bf16;
  else if (type == "float16")
    config.torch_dtype = dtype::f16;
  else
    in.fail("field '" + type_key + "' = '" + type + "' is not supported (float32, bfloat16, float16)");
}

void refuse_rope_scaling(field_reader& in) {
  if (in.has("rope_scaling"))
    in.fail("rope_scaling " + in.root()["rope_scaling"].dump() + " is not supported for this model type");
}

// qwen2_moe and qwen3_moe share the sparse-layer rule and most field names.
void read_qwen(field_reader& in, model_config& config) {
  config.rope_theta = in.positive_number_or("rope_theta", 10000.0);
  config.num_experts = in.positive_int("num_experts");
  config.moe_intermediate_size = in.positive_int("moe_intermediate_size");
  config.norm_topk_prob = in.boolean_or("norm_topk_prob", false);
  if (in.boolean_or("use_sliding_window", false))
    in.fail("use_sliding_window = true is not supported (sliding-window attention)");

  std::int64_t sparse_step = in.positive_int_or("decoder_sparse_step", 1);
  std::set<std::int64_t> mlp_only;
  for (std::int64_t layer : in.int_list_or_empty("mlp_only_layers")) {
    if (layer < 0 || layer >= config.num_layers)
      in.fail("mlp_only_layers names layer " + std::to_string(layer) + ", outside 0.." +
              std::to_string(config.num_layers - 1));
    mlp_only.insert(layer);
  }
  config.sparse_layers.assign(std::size_t(config.num_layers), false);
  bool any_dense = false;
  for (std::int64_t i = 0; i < config.num_layers; ++i) {
    bool sparse = !mlp_only.count(i) && (i + 1) % sparse_step == 0;
    config.sparse_layers[std::size_t(i)] = sparse;
    any_dense = any_dense || !sparse;
  }
  // Dense layers need intermediate_size; it is ignored (and may be absent) otherwise.
  config.intermediate_size =
      any_dense ? in.positive_int("intermediate_size") : in.positive_int_or("intermediate_size", 0);
}

// DeepSeek-V2 (DeepSeek's modeling_deepseek.py and Hugging Face's deepseek_v2). Settings on
// which the two implementations compute different things are refused rather than guessed.
void read_deepseek(field_reader& in, model_config& config) {
  config.rope_theta = in.positive_number_or("rope_theta", 10000.0);
  config.q_lora_rank = in.positive_int_or("q_lora_rank", 0);  // null: plain q_proj
  config.kv_lora_rank = in.positive_int("kv_lora_rank");
  config.qk_nope_head_dim = in.positive_int("qk_nope_head_dim");
  config.qk_rope_head_dim = in.positive_int("qk_rope_head_dim");
  config.v_head_dim = in.positive_int("v_head_dim");
  config.head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim;
  config.num_kv_heads = config.num_heads;  // every head has its own k_nope and v
  config.num_experts = in.positive_int("n_routed_experts");
  config.moe_intermediate_size = in.positive_int("moe_intermediate_size");
  config.shared_expert_intermediate_size =
      config.moe_intermediate_size * in.count_or("n_shared_experts", 0);
  config.routed_scaling_factor = float(in.positive_number_or("routed_scaling_factor", 1.0));
  config.n_group = in.positive_int_or("n_group", 1);
  config.topk_group = in.positive_int_or("topk_group", 1);
  if (in.boolean_or("attention_bias", false))
    in.fail("attention_bias = true is not supported for deepseek_v2");
  // With it DeepSeek renormalises and drops routed_scaling_factor; Hugging Face only scales.
  if (in.boolean_or("norm_topk_prob", false))
    in.fail("norm_topk_prob = true is not supported for deepseek_v2 (DeepSeek's and Hugging Face's "
            "implementations disagree on it)");
  std::string scoring = in.string_or("scoring_func", "softmax");
  if (scoring != "softmax")
    in.fail("scoring_func '" + scoring + "' is not supported (only 'softmax')");
  std::string method = in.string_or("topk_method", "greedy");
  if (method == "greedy") {
    config.topk = topk_method::greedy;
  } else if (method == "group_limited_greedy") {
    config.topk = topk_method::group_limited_greedy;
    config.n_group = in.positive_int("n_group");
    config.topk_group = in.positive_int("topk_group");
  } else {
    in.fail("topk_method '" + method + "' is not supported (greedy, group_limited_greedy)");
  }

  // Layer i is sparse when i >= first_k_dense_replace and i % moe_layer_freq == 0; the two
  // implementations place the dense layers differently when moe_layer_freq != 1.
  std::int64_t first_dense = in.count_or("first_k_dense_replace", 0);
  std::int64_t freq = in.positive_int_or("moe_layer_freq", 1);
  if (freq != 1)
    in.fail("moe_layer_freq = " + std::to_string(freq) + " is not supported for deepseek_v2 (only 1)");
  config.sparse_layers.assign(std::size_t(config.num_layers), false);
  for (std::int64_t i = first_dense; i < config.num_layers; ++i)
    config.sparse_layers[std::size_t(i)] = true;
  config.intermediate_size = first_dense > 0 ? in.positive_int("intermediate_size")
                                             : in.positive_int_or("intermediate_size", 0);

  if (!in.has("rope_scaling"))
    return;
  const json& scaling = in.root()["rope_scaling"];
  if (!scaling.is_object()) {
    in.fail("field 'rope_scaling' must be an object, got " + scaling.dump());
    return;
  }
  field_reader rs{scaling, "rope_scaling"};
  std::string kind = rs.string_or(rs.has("type") ? "type" : "rope_type", "");
  if (kind != "yarn") {
    in.fail("rope_scaling type '" + kind + "' is not supported for deepseek_v2 (only 'yarn')");
    return;
  }
  yarn_scaling& y = config.yarn;
  if (!rs.has("factor"))
    rs.fail("missing required field 'factor'");
  y.factor = rs.positive_number_or("factor", y.factor);
  y.original_max_position_embeddings =
      double(rs.positive_int_or("original_max_position_embeddings", 4096));
  y.beta_fast = rs.positive_number_or("beta_fast", y.beta_fast);
  y.beta_slow = rs.positive_number_or("beta_slow", y.beta_slow);
  y.mscale = rs.non_negative_number_or("mscale", y.mscale);
  y.mscale_all_dim = rs.non_negative_number_or("mscale_all_dim", y.mscale_all_dim);
  if (rs.failed())
    in.fail(rs.message());
  config.has_yarn = true;
}

}  // namespace

std::string_view to_string(architecture arch) {
  switch (arch) {
    case architecture::qwen3_moe:
      return "qwen3_moe";
    case architecture::qwen2_moe:
      return "qwen2_moe";
    case architecture::mixtral:
      return "mixtral";
    case architecture::deepseek_v2:
      return "deepseek_v2";
  }
  return "?";
}

result<model_config> parse_config(std::string_view json_text, const std::string& source) {
  json root = json::parse(json_text.begin(), json_text.end(), nullptr, false);
  if (root.is_discarded())
    return make_error(error_code::invalid_config, source + ": not valid JSON");
  if (!root.is_object())
    return make_error(error_code::invalid_config, source + ": expected a JSON object");

  field_reader in{root, source};
  model_config config;
  std::string type = in.string_or("model_type", "");
  if (in.failed())
    return in.take_error();
  if (type.empty())
    return make_error(error_code::invalid_config, source + ": missing required field 'model_type'");

  read_common(in, config);
  if (type == "qwen3_moe") {
    config.arch = architecture::qwen3_moe;
    refuse_rope_scaling(in);
    read_qwen(in, config);
    config.qk_norm = true;
    config.qkv_bias = config.o_bias = in.boolean_or("attention_bias", false);
  } else if (type == "qwen2_moe") {
    config.arch = architecture::qwen2_moe;
    refuse_rope_scaling(in);
    read_qwen(in, config);
    config.shared_expert_intermediate_size = in.positive_int("shared_expert_intermediate_size");
    config.shared_expert_gated = true;
    config.qkv_bias = in.boolean_or("qkv_bias", true);
  } else if (type == "mixtral") {
    config.arch = architecture::mixtral;
    refuse_rope_scaling(in);
    config.rope_theta = in.positive_number_or("rope_theta", 1e6);
    config.num_experts = in.positive_int("num_local_experts");
    config.moe_intermediate_size = in.positive_int("intermediate_size");
    config.norm_topk_prob = true;  // Mixtral always renormalises its top-k weights.
    config.sparse_layers.assign(std::size_t(config.num_layers), true);
    if (in.has("sliding_window"))
      in.fail("sliding_window = " + root["sliding_window"].dump() +
              " is not supported (sliding-window attention); use null");
  } else if (type == "deepseek_v2") {
    config.arch = architecture::deepseek_v2;
    read_deepseek(in, config);
  } else {
    return make_error(error_code::unsupported,
                      source + ": model_type '" + type +
                          "' is not supported (supported: qwen3_moe, qwen2_moe, mixtral, deepseek_v2)");
  }
  if (in.failed())
    return in.take_error();

  auto invalid = [&](const std::string& message) {
    return make_error(error_code::invalid_config, source + ": " + message);
  };
  if (config.num_heads % config.num_kv_heads != 0)
    return invalid("num_attention_heads (" + std::to_string(config.num_heads) +
                   ") must be a multiple of num_key_value_heads (" +
                   std::to_string(config.num_kv_heads) + ")");
  if (config.rope_dim() % 2 != 0)
    return invalid(std::string{config.mla() ? "qk_rope_head_dim" : "head_dim"} + " (" +
                   std::to_string(config.rope_dim()) + ") must be even for RoPE");
  if (config.num_experts_per_tok > config.num_experts)
    return invalid("num_experts_per_tok (" + std::to_string(config.num_experts_per_tok) +
                   ") exceeds the number of experts (" + std::to_string(config.num_experts) + ")");
  if (config.topk_group > config.n_group)
    return invalid("topk_group (" + std::to_string(config.topk_group) + ") exceeds n_group (" +
                   std::to_string(config.n_group) + ")");
  if (config.topk == topk_method::group_limited_greedy) {
    if (config.num_experts % config.n_group != 0)
      return invalid("n_routed_experts (" + std::to_string(config.num_experts) +
                     ") must be a multiple of n_group (" + std::to_string(config.n_group) + ")");
    if (config.num_experts_per_tok > config.topk_group * (config.num_experts / config.n_group))
      return invalid("num_experts_per_tok (" + std::to_string(config.num_experts_per_tok) +
                     ") exceeds the experts of topk_group (" + std::to_string(config.topk_group) +
                     ") groups");
  }
  return config;
}

result<model_config> load_config(const std::filesystem::path& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec))
    return make_error(error_code::io_error, "model directory '" + dir.string() + "' does not exist");
  std::filesystem::path file = dir / "config.json";
  std::ifstream in{file};
  if (!in)
    return make_error(error_code::io_error, "cannot open '" + file.string() + "'");
  std::stringstream text;
  text << in.rdbuf();
  return parse_config(text.str(), file.string());
}

std::int64_t parameter_breakdown::active_per_token(const model_config& config) const {
  std::int64_t routed_per_layer_per_expert = 3 * config.hidden_size * config.moe_intermediate_size;
  std::int64_t num_sparse = 0;
  for (bool sparse : config.sparse_layers)
    num_sparse += sparse;
  return total() - routed_experts +
         num_sparse * config.num_experts_per_tok * routed_per_layer_per_expert;
}

parameter_breakdown count_parameters(const model_config& c) {
  parameter_breakdown p;
  std::int64_t h = c.hidden_size;
  p.embedding = c.vocab_size * h;
  p.lm_head = c.tie_word_embeddings ? 0 : c.vocab_size * h;
  p.norms = h;  // final norm
  for (std::int64_t layer = 0; layer < c.num_layers; ++layer) {
    if (c.mla()) {
      std::int64_t q = c.q_lora_rank > 0 ? h * c.q_lora_rank + c.q_lora_rank * c.q_dim() : h * c.q_dim();
      p.attention += q + h * (c.kv_lora_rank + c.qk_rope_head_dim) +
                     c.kv_lora_rank * c.num_heads * (c.qk_nope_head_dim + c.v_head_dim) +
                     c.num_heads * c.v_head_dim * h;
      p.norms += c.q_lora_rank + c.kv_lora_rank;  // q_a_layernorm, kv_a_layernorm
    } else {
      p.attention += h * c.q_dim() + 2 * h * c.kv_dim() + c.q_dim() * h;
    }
    if (c.qkv_bias)
      p.attention += c.q_dim() + 2 * c.kv_dim();
    if (c.o_bias)
      p.attention += h;
    p.norms += 2 * h + (c.qk_norm ? 2 * c.head_dim : 0);
    if (c.sparse_layers[std::size_t(layer)]) {
      p.router += c.num_experts * h;
      p.routed_experts += c.num_experts * 3 * h * c.moe_intermediate_size;
      if (c.shared_expert_intermediate_size > 0)
        p.shared_experts += 3 * h * c.shared_expert_intermediate_size + (c.shared_expert_gated ? h : 0);
    } else {
      p.dense_mlp += 3 * h * c.intermediate_size;
    }
  }
  return p;
}

}  // namespace moert::model
