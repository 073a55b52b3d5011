// 16-bit checkpoints stay 16-bit: BF16 and F16 weights are held as stored and widened in the
// kernels, so a model gives the tokens and logits of its f32 upcast (load_options::upcast_to_f32,
// what the loader used to do) bit for bit, alone and batched, from half the weight bytes.
// Checkpoints are made here: the fixtures' f32 weights rounded to bf16 / f16, and a synthetic
// qwen3_moe of hidden size 1024.
#include <catch2/catch.hpp>

#include "core/rng.hpp"
#include "model/forward.hpp"
#include "model/safetensors.hpp"
#include "model/weights.hpp"
#include "test_support.hpp"

#include <nlohmann/json.hpp>

#include <atomic>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace moert;
using namespace moert::model;

namespace {

struct temp_dir {
  fs::path path;
  temp_dir() {
    static std::atomic<int> counter{0};
    std::random_device rd;
    path = fs::temp_directory_path() / ("moert_w16_" + std::to_string(rd()) + "_" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
};

// f32 → 16-bit, round to nearest even (what torch's .to(bfloat16 / float16) does).
std::uint16_t to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return std::uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
std::uint16_t to_f16(float f) {
  _Float16 h = static_cast<_Float16>(f);
  std::uint16_t bits;
  std::memcpy(&bits, &h, sizeof bits);
  return bits;
}

struct tensor {
  std::vector<std::int64_t> shape;
  std::vector<float> values;
};

// Writes `tensors` as one model.safetensors in `type` (the host is little-endian).
void write_safetensors(const fs::path& file, const std::map<std::string, tensor>& tensors, dtype type) {
  nlohmann::json header = nlohmann::json::object();
  std::vector<char> data;
  for (const auto& [name, t] : tensors) {
    std::size_t begin = data.size();
    for (float v : t.values) {
      if (type == dtype::f32) {
        const char* p = reinterpret_cast<const char*>(&v);
        data.insert(data.end(), p, p + 4);
      } else {
        std::uint16_t bits = type == dtype::bf16 ? to_bf16(v) : to_f16(v);
        data.push_back(char(bits & 0xff));
        data.push_back(char(bits >> 8));
      }
    }
    header[name] = {{"dtype", std::string(safetensors_name(type))},
                    {"shape", t.shape},
                    {"data_offsets", {begin, data.size()}}};
  }
  std::string text = header.dump();
  std::uint64_t len = text.size();
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  for (int i = 0; i < 8; ++i)
    out.put(char(len >> (8 * i)));
  out.write(text.data(), std::streamsize(text.size()));
  out.write(data.data(), std::streamsize(data.size()));
  REQUIRE(out.good());
}

// The fixture `name` with every tensor rounded to `type`, written to `dir`.
bool convert_fixture(const std::string& name, dtype type, const fs::path& dir) {
  fs::path src = test::fixture_dir(name);
  if (src.empty())
    return false;
  auto ck = checkpoint::open(src);
  REQUIRE(ck.ok());
  std::map<std::string, tensor> tensors;
  for (const auto& [tname, view] : ck->tensors()) {
    auto values = ck->read_f32(tname, view.shape);
    REQUIRE(values.ok());
    tensors[tname] = {view.shape, std::move(values.value())};
  }
  fs::copy_file(src / "config.json", dir / "config.json");
  write_safetensors(dir / "model.safetensors", tensors, type);
  return true;
}

// A qwen3_moe checkpoint of hidden size 1024 with random weights, in `type`.
void write_synthetic_1024(dtype type, const fs::path& dir) {
  const std::int64_t hidden = 1024, layers = 2, heads = 16, kv_heads = 4, head_dim = 64,
                     experts = 8, ffn = 256, vocab = 512;
  nlohmann::json config = {{"model_type", "qwen3_moe"}, {"hidden_size", hidden},
                           {"num_hidden_layers", layers}, {"num_attention_heads", heads},
                           {"num_key_value_heads", kv_heads}, {"head_dim", head_dim},
                           {"num_experts", experts}, {"num_experts_per_tok", 2},
                           {"moe_intermediate_size", ffn}, {"intermediate_size", 4 * hidden},
                           {"norm_topk_prob", true}, {"vocab_size", vocab},
                           {"rms_norm_eps", 1e-6}, {"tie_word_embeddings", false}};
  std::ofstream(dir / "config.json") << config.dump();
  rng gen{21};
  std::map<std::string, tensor> t;
  auto lin = [&](const std::string& name, std::int64_t rows, std::int64_t cols) {
    tensor& out = t[name];
    out.shape = {rows, cols};
    out.values.resize(std::size_t(rows * cols));
    float scale = 1.0f / std::sqrt(float(cols));
    for (float& v : out.values)
      v = gen.uniform(-scale, scale);
  };
  auto norm = [&](const std::string& name, std::int64_t n) {
    tensor& out = t[name];
    out.shape = {n};
    out.values.resize(std::size_t(n));
    for (float& v : out.values)
      v = gen.uniform(0.8f, 1.2f);
  };
  lin("model.embed_tokens.weight", vocab, hidden);
  for (std::int64_t i = 0; i < layers; ++i) {
    std::string p = "model.layers." + std::to_string(i) + ".";
    norm(p + "input_layernorm.weight", hidden);
    norm(p + "post_attention_layernorm.weight", hidden);
    lin(p + "self_attn.q_proj.weight", heads * head_dim, hidden);
    lin(p + "self_attn.k_proj.weight", kv_heads * head_dim, hidden);
    lin(p + "self_attn.v_proj.weight", kv_heads * head_dim, hidden);
    lin(p + "self_attn.o_proj.weight", hidden, heads * head_dim);
    norm(p + "self_attn.q_norm.weight", head_dim);
    norm(p + "self_attn.k_norm.weight", head_dim);
    lin(p + "mlp.gate.weight", experts, hidden);
    for (std::int64_t e = 0; e < experts; ++e) {
      std::string q = p + "mlp.experts." + std::to_string(e) + ".";
      lin(q + "gate_proj.weight", ffn, hidden);
      lin(q + "up_proj.weight", ffn, hidden);
      lin(q + "down_proj.weight", hidden, ffn);
    }
  }
  norm("model.norm.weight", hidden);
  lin("lm_head.weight", vocab, hidden);
  write_safetensors(dir / "model.safetensors", t, type);
}

std::vector<std::vector<std::int32_t>> prompts_for(std::int64_t vocab) {
  rng gen{8};
  std::vector<std::vector<std::int32_t>> prompts;
  for (std::size_t len : {6u, 1u, 9u, 3u}) {
    std::vector<std::int32_t> p(len);
    for (auto& id : p)
      id = std::int32_t(gen.next_u64() % std::uint64_t(vocab));
    prompts.push_back(p);
  }
  return prompts;
}

std::vector<float> logits_of(reference_model& m, const std::vector<std::vector<std::int32_t>>& prompts) {
  std::vector<kv_cache> caches(prompts.size(), kv_cache{m.config()});
  std::vector<forward_segment> segments;
  for (std::size_t i = 0; i < prompts.size(); ++i)
    segments.push_back({&caches[i], prompts[i]});
  auto logits = m.forward(segments, logits_for::every_token);
  REQUIRE(logits.ok());
  return logits.value();
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// The checkpoint in `dir` (stored as `type`) against its f32 upcast: resident bytes, then
// logits batched and alone and greedy / sampled tokens, all bit-identical.
void check_against_upcast(const fs::path& dir, dtype type) {
  auto kept = load_checkpoint(dir);
  REQUIRE(kept.ok());
  load_options upcast_options;
  upcast_options.upcast_to_f32 = true;
  auto upcast = load_checkpoint(dir, upcast_options);
  REQUIRE(upcast.ok());
  CHECK(kept->weights.unexpected_tensors.empty());

  weight_bytes k = resident_bytes(kept->weights), u = resident_bytes(upcast->weights);
  CHECK(u.bf16 == 0);
  CHECK(u.f16 == 0);
  std::size_t half_bytes = type == dtype::bf16 ? k.bf16 : k.f16;
  CHECK(half_bytes > 0);
  CHECK((type == dtype::bf16 ? k.f16 : k.bf16) == 0);
  // Every 16-bit byte is two f32 bytes in the upcast; what stays f32 is the same in both.
  CHECK(2 * half_bytes + k.f32 == u.f32);
  CHECK(kept->weights.lm_head.type() == type);
  CHECK(kept->weights.layers[0].router.type() == dtype::f32);

  const model_config& c = kept->config;
  reference_model a{c, std::move(kept->weights), 2};
  reference_model b{upcast->config, std::move(upcast->weights), 2};
  auto prompts = prompts_for(c.vocab_size);
  auto batched = logits_of(a, prompts);
  CHECK(same_bits(batched, logits_of(b, prompts)));
  std::size_t row = 0, vocab = std::size_t(c.vocab_size);
  for (const auto& prompt : prompts) {
    auto alone = logits_of(a, {prompt});
    std::vector<float> slice(batched.begin() + std::ptrdiff_t(row * vocab),
                             batched.begin() + std::ptrdiff_t((row + prompt.size()) * vocab));
    CHECK(same_bits(alone, slice));
    CHECK(same_bits(alone, logits_of(b, {prompt})));
    row += prompt.size();
  }

  std::vector<generation_request> requests;
  for (std::size_t i = 0; i < prompts.size(); ++i)
    requests.push_back({i, prompts[i], 5, i % 2 ? sampling_params{0.9f, 20, 0.95f, 77} : sampling_params{}});
  auto together = generate(a, requests, decode_mode::kv_cache);
  auto reference = generate(b, requests, decode_mode::kv_cache);
  REQUIRE(together.ok());
  REQUIRE(reference.ok());
  CHECK(*together == *reference);
  for (std::size_t i = 0; i < requests.size(); ++i) {
    auto alone = generate(a, std::span{&requests[i], 1}, decode_mode::kv_cache);
    REQUIRE(alone.ok());
    CHECK((*alone)[0] == (*together)[i]);
  }
}

std::size_t rss_file_kib() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("RssFile:", 0) == 0)
      return std::stoul(line.substr(8));
  return 0;
}

}  // namespace

TEST_CASE("bf16 and f16 fixtures give the bits of their f32 upcast", "[weights][bf16]") {
  bool any = false;
  for (const char* name : {"qwen3_moe_tiny", "mixtral_tiny", "deepseek_v2_tiny"})
    for (dtype type : {dtype::bf16, dtype::f16}) {
      INFO(name << " as " << safetensors_name(type));
      temp_dir dir;
      if (!convert_fixture(name, type, dir.path))
        continue;
      any = true;
      check_against_upcast(dir.path, type);
    }
  if (!any)
    WARN("../shared/fixtures not found: only the synthetic checkpoints were checked");
}

TEST_CASE("a hidden-size-1024 bf16 / f16 checkpoint gives the bits of its upcast from half the bytes",
          "[weights][bf16]") {
  for (dtype type : {dtype::bf16, dtype::f16}) {
    INFO(safetensors_name(type));
    temp_dir dir;
    write_synthetic_1024(type, dir.path);
    check_against_upcast(dir.path, type);

    // Against the same weights stored as f32: the linear layers take exactly half the bytes.
    temp_dir f32_dir;
    write_synthetic_1024(dtype::f32, f32_dir.path);
    auto half = load_checkpoint(dir.path);
    auto full = load_checkpoint(f32_dir.path);
    REQUIRE(half.ok());
    REQUIRE(full.ok());
    weight_bytes h = resident_bytes(half->weights), f = resident_bytes(full->weights);
    CHECK(f.bf16 + f.f16 == 0);
    CHECK(h.f32 + 2 * (h.bf16 + h.f16) == f.f32);
    // Embedding (512 × 1024), norms and routers stay f32: under 3 % of this model.
    CHECK(double(h.total()) < 0.515 * double(f.total()));
  }
}

TEST_CASE("loading drops the mapped pages of each tensor it has copied", "[weights]") {
  temp_dir dir;
  write_synthetic_1024(dtype::f32, dir.path);
  std::size_t file_kib = fs::file_size(dir.path / "model.safetensors") / 1024;
  auto ck = checkpoint::open(dir.path);
  REQUIRE(ck.ok());
  const tensor_view* view = ck->find("model.layers.0.self_attn.q_proj.weight");  // 4 MiB
  REQUIRE(view != nullptr);
  std::size_t before = rss_file_kib();
  auto values = ck->read_f32(view->name, view->shape);
  REQUIRE(values.ok());
  std::size_t touched = rss_file_kib();
  CHECK(touched >= before + 3 * 1024);  // reading faulted the tensor's pages in
  ck->release(*view);
  CHECK(rss_file_kib() + 3 * 1024 <= touched);
  // Still readable after release: the pages come back from the file.
  auto again = ck->read_f32(view->name, view->shape);
  REQUIRE(again.ok());
  CHECK(*again == *values);

  // After a whole load not one page of the file is still mapped (pagemap's present bit), also
  // none that the kernel mapped around a fault into an already released neighbour.
  std::size_t start = rss_file_kib();
  auto weights = load_weights(*load_config(dir.path), *ck);
  REQUIRE(weights.ok());
  INFO("file " << file_kib << " KiB, RssFile " << start << " -> " << rss_file_kib() << " KiB");
  CHECK(rss_file_kib() < start + file_kib / 10);
  std::ifstream pagemap("/proc/self/pagemap", std::ios::binary);
  REQUIRE(pagemap.good());
  std::size_t present = 0, pages = 0;
  for (const auto& [name, v] : ck->tensors()) {
    const auto first = reinterpret_cast<std::uintptr_t>(v.data) / 4096;
    const auto last = (reinterpret_cast<std::uintptr_t>(v.data) + v.num_bytes + 4095) / 4096;
    for (auto page = first; page < last; ++page, ++pages) {
      std::uint64_t entry = 0;
      pagemap.seekg(std::streamoff(page * 8));
      pagemap.read(reinterpret_cast<char*>(&entry), 8);
      present += entry >> 63;
    }
  }
  CHECK(pages > file_kib / 8);
  CHECK(present == 0);
}
