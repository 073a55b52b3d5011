#include "policy/testbed_json.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <initializer_list>

namespace moert::policy {

using json = nlohmann::json;

namespace {

constexpr double gib = double(1ull << 30);

// Field readers over one JSON object; every error names the source and the key path.
class reader {
public:
  reader(const json& object, std::string source, std::string path)
      : object_(object), source_(std::move(source)), path_(std::move(path)) {}

  error fail(std::string_view key, std::string_view what) const {
    return make_error(error_code::invalid_config,
                      source_ + ": '" + path_ + std::string(key) + "' " + std::string(what));
  }

  status only(std::initializer_list<std::string_view> keys) const {
    for (const auto& [key, value] : object_.items()) {
      bool known = false;
      for (std::string_view k : keys)
        known = known || key == k;
      if (!known)
        return fail(key, "is not a known key");
    }
    return status::success();
  }

  const json* find(std::string_view key) const {
    auto it = object_.find(std::string(key));
    return it == object_.end() ? nullptr : &*it;
  }

  result<std::size_t> count(std::string_view key, std::optional<std::size_t> fallback = std::nullopt) const {
    const json* v = find(key);
    if (!v || v->is_null()) {
      if (fallback)
        return *fallback;
      return fail(key, "is missing");
    }
    if (!v->is_number_integer() || v->get<std::int64_t>() < 0)
      return fail(key, "must be a non-negative integer");
    return std::size_t(v->get<std::int64_t>());
  }

  result<double> number(std::string_view key, std::optional<double> fallback = std::nullopt) const {
    const json* v = find(key);
    if (!v) {
      if (fallback)
        return *fallback;
      return fail(key, "is missing");
    }
    if (!v->is_number() || !std::isfinite(v->get<double>()))
      return fail(key, "must be a finite number");
    return v->get<double>();
  }

  result<std::string> text(std::string_view key, std::optional<std::string> fallback = std::nullopt) const {
    const json* v = find(key);
    if (!v) {
      if (fallback)
        return *fallback;
      return fail(key, "is missing");
    }
    if (v->is_array()) {  // notes may be a list of lines
      std::string joined;
      for (const json& line : *v) {
        if (!line.is_string())
          return fail(key, "must be a string or a list of strings");
        if (!joined.empty())
          joined += '\n';
        joined += line.get_ref<const std::string&>();
      }
      return joined;
    }
    if (!v->is_string())
      return fail(key, "must be a string");
    return v->get<std::string>();
  }

  reader child(const json& object, std::string_view key) const {
    return reader{object, source_, path_ + std::string(key) + "."};
  }

private:
  const json& object_;
  std::string source_;
  std::string path_;
};

#define MOERT_GET(var, expr)   \
  auto var##_r = (expr);       \
  if (!var##_r)                \
    return var##_r.err();      \
  auto var = std::move(var##_r.value())

result<json> parse_object(std::string_view text, const std::string& source) {
  json doc = json::parse(text.begin(), text.end(), nullptr, false);
  if (doc.is_discarded())
    return make_error(error_code::invalid_config, source + ": not valid JSON");
  if (!doc.is_object())
    return make_error(error_code::invalid_config, source + ": the top level must be an object");
  return doc;
}

// A fitted intercept may come out slightly negative on a fast backend; it is kept as fitted.
result<linear_fit> fit_from(const reader& r) {
  MOERT_TRY(r.only({"alpha", "beta", "r2", "ag", "eg", "note"}));
  MOERT_GET(alpha, r.number("alpha"));
  MOERT_GET(beta, r.number("beta"));
  MOERT_GET(r2, r.number("r2", 1.0));
  if (beta < 0)
    return r.fail("beta", "must be >= 0");
  return linear_fit{alpha, beta, r2};
}

result<linear_fit> parse_fit(const reader& parent, std::string_view key) {
  const json* v = parent.find(key);
  if (!v || !v->is_object())
    return parent.fail(key, "must be an object {alpha, beta, r2}");
  return fit_from(parent.child(*v, key));
}

json fit_json(const linear_fit& f) {
  return json{{"alpha", f.alpha}, {"beta", f.beta}, {"r2", f.r2}};
}

}  // namespace

result<model_shape> parse_model_shape(std::string_view json_text, const std::string& source) {
  MOERT_GET(doc, parse_object(json_text, source));
  reader r{doc, source, ""};
  MOERT_TRY(r.only({"name", "source", "notes", "num_layers", "num_dense_layers", "dense_intermediate",
                    "hidden", "num_experts", "top_k", "expert_intermediate", "num_shared",
                    "shared_intermediate", "attention", "vocab", "dtype_bytes"}));
  model_shape s;
  MOERT_GET(name, r.text("name"));
  s.name = name;
  struct field {
    const char* key;
    std::size_t* out;
    std::optional<std::size_t> fallback;
  };
  for (field f : std::initializer_list<field>{{"num_layers", &s.num_layers, std::nullopt},
                                              {"num_dense_layers", &s.num_dense_layers, 0},
                                              {"dense_intermediate", &s.dense_intermediate, 0},
                                              {"hidden", &s.hidden, std::nullopt},
                                              {"num_experts", &s.num_experts, std::nullopt},
                                              {"top_k", &s.top_k, std::nullopt},
                                              {"expert_intermediate", &s.expert_intermediate, std::nullopt},
                                              {"num_shared", &s.num_shared, 0},
                                              {"shared_intermediate", &s.shared_intermediate, 0},
                                              {"vocab", &s.vocab, std::nullopt},
                                              {"dtype_bytes", &s.dtype_bytes, 2}}) {
    MOERT_GET(v, r.count(f.key, f.fallback));
    *f.out = v;
  }
  const json* att = r.find("attention");
  if (!att || !att->is_object())
    return r.fail("attention", "must be an object with 'kind' gqa or mla");
  reader a = r.child(*att, "attention");
  MOERT_GET(kind, a.text("kind"));
  if (kind == "gqa") {
    s.attention = attention_kind::gqa;
    MOERT_TRY(a.only({"kind", "num_heads", "num_kv_heads", "head_dim"}));
    MOERT_GET(heads, a.count("num_heads"));
    MOERT_GET(kv, a.count("num_kv_heads"));
    MOERT_GET(dim, a.count("head_dim"));
    s.gqa = {heads, kv, dim};
  } else if (kind == "mla") {
    s.attention = attention_kind::mla;
    MOERT_TRY(a.only({"kind", "num_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                      "qk_rope_head_dim", "v_head_dim"}));
    MOERT_GET(heads, a.count("num_heads"));
    MOERT_GET(q_lora, a.count("q_lora_rank", 0));
    MOERT_GET(kv_lora, a.count("kv_lora_rank"));
    MOERT_GET(nope, a.count("qk_nope_head_dim"));
    MOERT_GET(rope, a.count("qk_rope_head_dim"));
    MOERT_GET(v, a.count("v_head_dim"));
    s.mla = {heads, q_lora, kv_lora, nope, rope, v};
  } else {
    return a.fail("kind", "must be 'gqa' or 'mla'");
  }
  auto valid = validate(s);
  if (!valid)
    return make_error(error_code::invalid_config, source + ": " + valid.err().message);
  return s;
}

std::string to_json(const model_shape& s) {
  json att;
  if (s.attention == attention_kind::gqa)
    att = {{"kind", "gqa"}, {"num_heads", s.gqa.num_heads}, {"num_kv_heads", s.gqa.num_kv_heads},
           {"head_dim", s.gqa.head_dim}};
  else
    att = {{"kind", "mla"},
           {"num_heads", s.mla.num_heads},
           {"q_lora_rank", s.mla.q_lora_rank},
           {"kv_lora_rank", s.mla.kv_lora_rank},
           {"qk_nope_head_dim", s.mla.qk_nope_head_dim},
           {"qk_rope_head_dim", s.mla.qk_rope_head_dim},
           {"v_head_dim", s.mla.v_head_dim}};
  json doc = {{"name", s.name},
              {"num_layers", s.num_layers},
              {"num_dense_layers", s.num_dense_layers},
              {"dense_intermediate", s.dense_intermediate},
              {"hidden", s.hidden},
              {"num_experts", s.num_experts},
              {"top_k", s.top_k},
              {"expert_intermediate", s.expert_intermediate},
              {"num_shared", s.num_shared},
              {"shared_intermediate", s.shared_intermediate},
              {"attention", att},
              {"vocab", s.vocab},
              {"dtype_bytes", s.dtype_bytes}};
  return doc.dump(2) + "\n";
}

result<testbed> parse_testbed(std::string_view json_text, const std::string& source) {
  MOERT_GET(doc, parse_object(json_text, source));
  reader r{doc, source, ""};
  MOERT_TRY(r.only({"name", "notes", "source", "units", "device_memory_gib", "reserved_gib", "threads",
                    "gemm", "attention", "shared_expert", "comm", "comm_default", "expert_gemm"}));
  testbed bed;
  MOERT_GET(name, r.text("name"));
  MOERT_GET(notes, r.text("notes", std::string{}));
  bed.name = name;
  bed.notes = notes;
  MOERT_GET(memory, r.number("device_memory_gib"));
  MOERT_GET(reserved, r.number("reserved_gib", 0.0));
  if (memory <= 0)
    return r.fail("device_memory_gib", "must be positive");
  if (reserved < 0 || reserved >= memory)
    return r.fail("reserved_gib", "must be in [0, device_memory_gib)");
  bed.device_memory_bytes = memory * gib;
  bed.reserved_bytes = reserved * gib;
  if (r.find("threads")) {
    MOERT_GET(threads, r.count("threads"));
    if (threads == 0)
      return r.fail("threads", "must be positive");
    bed.threads = threads;
  }
  MOERT_GET(gemm, parse_fit(r, "gemm"));
  MOERT_GET(attention, parse_fit(r, "attention"));
  bed.gemm = gemm;
  bed.attention = attention;
  if (r.find("shared_expert")) {
    MOERT_GET(shared, parse_fit(r, "shared_expert"));
    bed.shared_expert = shared;
  }
  if (r.find("comm_default")) {
    MOERT_GET(comm, parse_fit(r, "comm_default"));
    bed.comm_default = comm;
  }
  if (const json* list = r.find("comm")) {
    if (!list->is_array())
      return r.fail("comm", "must be a list of {ag, eg, alpha, beta, r2}");
    for (std::size_t i = 0; i < list->size(); ++i) {
      std::string key = "comm[" + std::to_string(i) + "]";
      if (!(*list)[i].is_object())
        return r.fail(key, "must be an object");
      reader item = r.child((*list)[i], key);
      MOERT_GET(ag, item.count("ag"));
      MOERT_GET(eg, item.count("eg"));
      if (ag == 0 || eg == 0)
        return item.fail(ag == 0 ? "ag" : "eg", "must be positive");
      MOERT_GET(fit, fit_from(item));
      bed.comm.push_back({ag, eg, fit});
    }
  }
  if (bed.comm.empty() && !bed.comm_default)
    return r.fail("comm", "or 'comm_default' must be given");
  if (const json* g = r.find("expert_gemm")) {
    if (!g->is_object())
      return r.fail("expert_gemm", "must be an object {dense_min_rows, source}");
    reader item = r.child(*g, "expert_gemm");
    MOERT_TRY(item.only({"dense_min_rows", "source"}));
    expert_gemm_crossover crossover;
    const json* rows = item.find("dense_min_rows");
    if (!rows)
      return item.fail("dense_min_rows", "is missing (null: dense never wins)");
    if (!rows->is_null()) {
      MOERT_GET(n, item.count("dense_min_rows"));
      if (n == 0)
        return item.fail("dense_min_rows", "must be positive (or null: dense never wins)");
      crossover.dense_min_rows = n;
    }
    MOERT_GET(source, item.text("source", std::string{}));
    crossover.source = source;
    bed.expert_gemm = crossover;
  }
  return bed;
}

std::string to_json(const testbed& bed) {
  json doc = {{"name", bed.name},
              {"notes", bed.notes},
              {"units", "alpha in ms; beta in ms per MAC (gemm, attention, shared_expert: x = MACs of "
                        "one of its three GEMMs) or ms per byte (comm: x = bytes per expert-group device)"},
              {"device_memory_gib", bed.device_memory_bytes / gib},
              {"reserved_gib", bed.reserved_bytes / gib},
              {"threads", bed.threads},
              {"gemm", fit_json(bed.gemm)},
              {"attention", fit_json(bed.attention)}};
  if (bed.shared_expert)
    doc["shared_expert"] = fit_json(*bed.shared_expert);
  json comm = json::array();
  for (const comm_fit& c : bed.comm) {
    json item = fit_json(c.fit);
    item["ag"] = c.ag;
    item["eg"] = c.eg;
    comm.push_back(item);
  }
  if (!comm.empty())
    doc["comm"] = comm;
  if (bed.comm_default)
    doc["comm_default"] = fit_json(*bed.comm_default);
  if (bed.expert_gemm) {
    json rows = bed.expert_gemm->dense_min_rows ? json(*bed.expert_gemm->dense_min_rows) : json(nullptr);
    doc["expert_gemm"] = {{"dense_min_rows", rows}, {"source", bed.expert_gemm->source}};
  }
  return doc.dump(2) + "\n";
}

}  // namespace moert::policy
