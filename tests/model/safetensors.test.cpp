#include "model/safetensors.hpp"

#include "test_support.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using json = nlohmann::json;
using moert::dtype;
using moert::model::checkpoint;
using Catch::Matchers::Contains;

namespace {

// A fresh directory under the system temp dir, removed with everything in it.
struct temp_dir {
  fs::path path;
  temp_dir() {
    static std::atomic<int> counter{0};
    std::random_device rd;
    path = fs::temp_directory_path() /
           ("moert_st_" + std::to_string(rd()) + "_" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
};

using bytes = std::vector<std::uint8_t>;

void write_raw(const fs::path& path, const bytes& content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(content.data()), std::streamsize(content.size()));
  REQUIRE(out.good());
}

// 8-byte little-endian header length, the header text, then the data area.
bytes encode(const std::string& header, const bytes& data, std::uint64_t header_len) {
  bytes out;
  for (int i = 0; i < 8; ++i)
    out.push_back(std::uint8_t(header_len >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}
bytes encode(const std::string& header, const bytes& data) {
  return encode(header, data, header.size());
}

void write_safetensors(const fs::path& path, const json& header, const bytes& data) {
  write_raw(path, encode(header.dump(), data));
}

bytes f32_bytes(const std::vector<float>& values) {
  bytes out(values.size() * 4);
  std::memcpy(out.data(), values.data(), out.size());  // the host is little-endian
  return out;
}

bytes u16_bytes(const std::vector<std::uint16_t>& values) {
  bytes out;
  for (auto v : values) {
    out.push_back(std::uint8_t(v & 0xff));
    out.push_back(std::uint8_t(v >> 8));
  }
  return out;
}

json entry(const std::string& dtype_name, std::vector<std::int64_t> shape, std::uint64_t begin,
           std::uint64_t end) {
  return {{"dtype", dtype_name}, {"shape", shape}, {"data_offsets", {begin, end}}};
}

// Opens `header`+`data` written as model.safetensors and expects an error naming `needle`.
void expect_rejected(const json& header, const bytes& data, const std::string& needle) {
  temp_dir dir;
  write_safetensors(dir.path / "model.safetensors", header, data);
  auto ck = checkpoint::open(dir.path);
  REQUIRE_FALSE(ck.ok());
  CHECK(ck.err().code == moert::error_code::invalid_checkpoint);
  CHECK_THAT(ck.err().message, Contains("model.safetensors"));
  CHECK_THAT(ck.err().message, Contains(needle));
}

}  // namespace

TEST_CASE("safetensors: F32, BF16 and F16 read back exactly", "[safetensors]") {
  temp_dir dir;
  // A 2-byte bf16 tensor first puts the f32 tensor at an unaligned address.
  bytes data = u16_bytes({0x3F80});                          // bf16 [1]:   1.0
  auto f32 = f32_bytes({1.5f, -2.0f, 0.25f, 1e30f, 0.0f, -0.0f});  // f32 [2, 3]
  data.insert(data.end(), f32.begin(), f32.end());
  auto f16 = u16_bytes({0x3C00, 0x0001, 0xC000, 0x7C00});    // f16 [4]
  data.insert(data.end(), f16.begin(), f16.end());
  json header = {
      {"__metadata__", {{"format", "pt"}}},
      {"a.bf16", entry("BF16", {1}, 0, 2)},
      {"b.f32", entry("F32", {2, 3}, 2, 26)},
      {"c.f16", entry("F16", {4}, 26, 34)},
      {"d.empty", entry("F32", {0, 5}, 34, 34)},
  };
  write_safetensors(dir.path / "model.safetensors", header, data);

  auto ck = checkpoint::open(dir.path);
  REQUIRE(ck.ok());
  CHECK(ck->tensors().size() == 4);

  const auto* b = ck->find("b.f32");
  REQUIRE(b != nullptr);
  CHECK(b->type == dtype::f32);
  CHECK(b->shape == std::vector<std::int64_t>{2, 3});
  CHECK(b->num_elements == 6);
  CHECK(b->num_bytes == 24);
  CHECK(ck->find("nope") == nullptr);

  auto bf = ck->read_f32("a.bf16", {1});
  REQUIRE(bf.ok());
  CHECK(*bf == std::vector<float>{1.0f});

  auto fl = ck->read_f32("b.f32", {2, 3});
  REQUIRE(fl.ok());
  CHECK(*fl == std::vector<float>{1.5f, -2.0f, 0.25f, 1e30f, 0.0f, -0.0f});
  CHECK(std::signbit((*fl)[5]));

  auto hf = ck->read_f32("c.f16", {4});
  REQUIRE(hf.ok());
  CHECK((*hf)[0] == 1.0f);
  CHECK((*hf)[1] == std::ldexp(1.0f, -24));  // the smallest f16 subnormal
  CHECK((*hf)[2] == -2.0f);
  CHECK(std::isinf((*hf)[3]));

  auto empty = ck->read_f32("d.empty", {0, 5});
  REQUIRE(empty.ok());
  CHECK(empty->empty());

  // Moving keeps the mappings (and so the views) alive.
  checkpoint moved = std::move(*ck);
  auto again = moved.read_f32("b.f32", {2, 3});
  REQUIRE(again.ok());
  CHECK((*again)[0] == 1.5f);
}

TEST_CASE("safetensors: open accepts a path to a single file", "[safetensors]") {
  temp_dir dir;
  write_safetensors(dir.path / "weights.safetensors", {{"x", entry("F32", {}, 0, 4)}},
                    f32_bytes({3.0f}));
  auto ck = checkpoint::open(dir.path / "weights.safetensors");
  REQUIRE(ck.ok());
  auto x = ck->read_f32("x", {});
  REQUIRE(x.ok());
  CHECK(*x == std::vector<float>{3.0f});
}

TEST_CASE("safetensors: sharded checkpoint loads every shard", "[safetensors]") {
  temp_dir dir;
  write_safetensors(dir.path / "model-00001-of-00002.safetensors",
                    {{"w1", entry("F32", {2}, 0, 8)}}, f32_bytes({1.0f, 2.0f}));
  write_safetensors(dir.path / "model-00002-of-00002.safetensors",
                    {{"w2", entry("BF16", {1}, 0, 2)}, {"unlisted", entry("F32", {1}, 2, 6)}},
                    [] {
                      bytes d = u16_bytes({0x4040});  // bf16 3.0
                      auto f = f32_bytes({7.0f});
                      d.insert(d.end(), f.begin(), f.end());
                      return d;
                    }());
  json index = {{"metadata", {{"total_size", 14}}},
                {"weight_map",
                 {{"w1", "model-00001-of-00002.safetensors"},
                  {"w2", "model-00002-of-00002.safetensors"}}}};
  std::ofstream(dir.path / "model.safetensors.index.json") << index.dump();

  auto ck = checkpoint::open(dir.path);
  REQUIRE(ck.ok());
  CHECK(ck->tensors().size() == 3);  // tensors missing from the index still load
  CHECK(*ck->read_f32("w1", {2}) == std::vector<float>{1.0f, 2.0f});
  CHECK(*ck->read_f32("w2", {1}) == std::vector<float>{3.0f});
  CHECK(*ck->read_f32("unlisted", {1}) == std::vector<float>{7.0f});
  CHECK(ck->find("w2")->file.filename() == "model-00002-of-00002.safetensors");
}

TEST_CASE("safetensors: malformed files are rejected with the file and tensor named",
          "[safetensors]") {
  SECTION("range past the data area") {
    expect_rejected({{"model.norm.weight", entry("F32", {25}, 0, 100)}},
                    f32_bytes(std::vector<float>(16)),
                    "tensor 'model.norm.weight': data_offsets [0, 100] end past the data area "
                    "(64 bytes)");
  }
  SECTION("overlapping ranges") {
    expect_rejected({{"first", entry("F32", {2}, 0, 8)}, {"second", entry("F32", {2}, 4, 12)}},
                    f32_bytes({0, 0, 0}), "overlap tensor 'first'");
  }
  SECTION("byte length differs from shape x dtype") {
    expect_rejected({{"w", entry("BF16", {3}, 0, 8)}}, f32_bytes({0, 0}), "tensor 'w'");
  }
  SECTION("dims whose product overflows 64 bits") {
    expect_rejected({{"huge", entry("F32", {4294967296LL, 4294967296LL, 16}, 0, 4)}},
                    f32_bytes({0}), "tensor 'huge': element count");
  }
  SECTION("byte size that overflows 64 bits") {
    expect_rejected({{"huge", entry("F32", {std::int64_t{1} << 62}, 0, 4)}}, f32_bytes({0}),
                    "tensor 'huge': byte size");
  }
  SECTION("unknown dtypes") {
    expect_rejected({{"d", entry("F64", {1}, 0, 8)}}, f32_bytes({0, 0}),
                    "tensor 'd': unsupported dtype 'F64'");
    expect_rejected({{"i", entry("I64", {1}, 0, 8)}}, f32_bytes({0, 0}),
                    "unsupported dtype 'I64'");
  }
  SECTION("negative dimension") {
    expect_rejected({{"neg", entry("F32", {-1}, 0, 4)}}, f32_bytes({0}), "tensor 'neg'");
  }
  SECTION("begin after end") {
    expect_rejected({{"rev", entry("F32", {0}, 4, 0)}}, f32_bytes({0}), "tensor 'rev'");
  }
  SECTION("ill-typed or missing fields") {
    expect_rejected({{"e", 5}}, {}, "tensor 'e'");
    expect_rejected({{"e", {{"shape", {1}}, {"data_offsets", {0, 4}}}}}, f32_bytes({0}),
                    "tensor 'e'");
    expect_rejected({{"e", {{"dtype", "F32"}, {"shape", "1"}, {"data_offsets", {0, 4}}}}},
                    f32_bytes({0}), "tensor 'e'");
    expect_rejected({{"e", {{"dtype", "F32"}, {"shape", {1.5}}, {"data_offsets", {0, 4}}}}},
                    f32_bytes({0}), "tensor 'e'");
    expect_rejected({{"e", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0}}}}},
                    f32_bytes({0}), "tensor 'e'");
    expect_rejected({{"e", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {-4, 0}}}}},
                    f32_bytes({0}), "tensor 'e'");
    expect_rejected({{"__metadata__", {{"k", 1}}}}, {}, "__metadata__");
  }
  SECTION("header that is a JSON array") {
    expect_rejected(json::array({1, 2}), {}, "not a JSON object");
  }
}

TEST_CASE("safetensors: broken framing is rejected", "[safetensors]") {
  temp_dir dir;
  const fs::path file = dir.path / "model.safetensors";
  auto open_error = [&] {
    auto ck = checkpoint::open(dir.path);
    REQUIRE_FALSE(ck.ok());
    CHECK_THAT(ck.err().message, Contains("model.safetensors"));
    return ck.err().message;
  };

  SECTION("truncated in the middle of the data") {
    bytes full = encode(json{{"w", entry("F32", {4}, 0, 16)}}.dump(), f32_bytes({1, 2, 3, 4}));
    write_raw(file, bytes(full.begin(), full.end() - 6));
    CHECK_THAT(open_error(), Contains("tensor 'w'"));
  }
  SECTION("empty file") {
    write_raw(file, {});
    CHECK_THAT(open_error(), Contains("too short"));
  }
  SECTION("shorter than the 8-byte length") {
    write_raw(file, {1, 0, 0});
    CHECK_THAT(open_error(), Contains("too short"));
  }
  SECTION("header length past the end of the file") {
    write_raw(file, encode("{}", {}, 3));
    CHECK_THAT(open_error(), Contains("header length 3"));
    write_raw(file, encode("{}", {}, ~std::uint64_t{0}));
    CHECK_THAT(open_error(), Contains("runs past the end"));
  }
  SECTION("header that is not JSON") {
    write_raw(file, encode("{\"w\": [", {}));
    CHECK_THAT(open_error(), Contains("not valid JSON"));
  }
  SECTION("a path that does not exist") {
    auto ck = checkpoint::open(dir.path / "absent");
    REQUIRE_FALSE(ck.ok());
    CHECK_THAT(ck.err().message, Contains("absent"));
  }
}

TEST_CASE("safetensors: read_f32 checks presence and shape", "[safetensors]") {
  temp_dir dir;
  write_safetensors(dir.path / "model.safetensors", {{"w", entry("F32", {2, 3}, 0, 24)}},
                    f32_bytes(std::vector<float>(6)));
  auto ck = checkpoint::open(dir.path);
  REQUIRE(ck.ok());

  auto missing = ck->read_f32("model.missing.weight", {2, 3});
  REQUIRE_FALSE(missing.ok());
  CHECK_THAT(missing.err().message, Contains("tensor 'model.missing.weight' is missing from"));
  CHECK_THAT(missing.err().message, Contains(dir.path.string()));

  auto wrong = ck->read_f32("w", {3, 2});
  REQUIRE_FALSE(wrong.ok());
  CHECK_THAT(wrong.err().message, Contains("model.safetensors"));
  CHECK_THAT(wrong.err().message, Contains("tensor 'w'"));
  CHECK_THAT(wrong.err().message, Contains("[2, 3]"));
  CHECK_THAT(wrong.err().message, Contains("[3, 2]"));
}

TEST_CASE("safetensors: malformed indexes are rejected", "[safetensors]") {
  temp_dir dir;
  const fs::path index = dir.path / "model.safetensors.index.json";
  write_safetensors(dir.path / "shard-1.safetensors", {{"a", entry("F32", {1}, 0, 4)}},
                    f32_bytes({1.0f}));
  auto open_error = [&](const json& content) {
    std::ofstream(index, std::ios::trunc) << content.dump();
    auto ck = checkpoint::open(dir.path);
    REQUIRE_FALSE(ck.ok());
    return ck.err().message;
  };

  SECTION("a shard that does not exist") {
    auto msg = open_error(
        {{"weight_map", {{"a", "shard-1.safetensors"}, {"b", "shard-2.safetensors"}}}});
    CHECK_THAT(msg, Contains("shard-2.safetensors"));
    CHECK_THAT(msg, Contains("does not exist"));
  }
  SECTION("an index that is not JSON") {
    std::ofstream(index, std::ios::trunc) << "{\"weight_map\": ";
    auto ck = checkpoint::open(dir.path);
    REQUIRE_FALSE(ck.ok());
    CHECK_THAT(ck.err().message, Contains("model.safetensors.index.json"));
    CHECK_THAT(ck.err().message, Contains("not valid JSON"));
  }
  SECTION("no weight_map") {
    CHECK_THAT(open_error({{"metadata", json::object()}}), Contains("weight_map"));
  }
  SECTION("shard names that leave the directory") {
    CHECK_THAT(open_error({{"weight_map", {{"a", "../shard-1.safetensors"}}}}),
               Contains("'../shard-1.safetensors'"));
    CHECK_THAT(open_error({{"weight_map", {{"a", (dir.path / "shard-1.safetensors").string()}}}}),
               Contains("not a plain file name"));
  }
  SECTION("a tensor missing from the shard the index names") {
    auto msg = open_error({{"weight_map", {{"a", "shard-1.safetensors"},
                                           {"ghost", "shard-1.safetensors"}}}});
    CHECK_THAT(msg, Contains("tensor 'ghost'"));
    CHECK_THAT(msg, Contains("shard-1.safetensors"));
  }
  SECTION("a tensor in two shards") {
    write_safetensors(dir.path / "shard-2.safetensors", {{"a", entry("F32", {1}, 0, 4)}},
                      f32_bytes({2.0f}));
    auto msg = open_error(
        {{"weight_map", {{"a", "shard-1.safetensors"}, {"b", "shard-2.safetensors"}}}});
    CHECK_THAT(msg, Contains("tensor 'a'"));
  }
  SECTION("a bad shard is reported by its file name") {
    write_raw(dir.path / "shard-2.safetensors", {0, 0});
    auto msg = open_error(
        {{"weight_map", {{"a", "shard-1.safetensors"}, {"b", "shard-2.safetensors"}}}});
    CHECK_THAT(msg, Contains("shard-2.safetensors"));
  }
}

TEST_CASE("safetensors: the tiny fixtures open", "[safetensors][fixture]") {
  for (const char* name : {"qwen3_moe_tiny", "mixtral_tiny", "deepseek_v2_tiny"}) {
    fs::path dir = moert::test::fixture_dir(name);
    if (dir.empty())
      continue;  // fixtures not checked out beside the source tree
    INFO(name);
    auto ck = checkpoint::open(dir);
    if (!ck.ok())
      FAIL(ck.err().what());
    CHECK_FALSE(ck->tensors().empty());
    if (std::string(name) == "qwen3_moe_tiny") {
      const auto* embed = ck->find("model.embed_tokens.weight");
      REQUIRE(embed != nullptr);
      CHECK(embed->shape == std::vector<std::int64_t>{384, 64});
      CHECK(embed->type == dtype::f32);
      auto values = ck->read_f32("model.embed_tokens.weight", {384, 64});
      REQUIRE(values.ok());
      CHECK(values->size() == 384 * 64);
    }
  }
}
