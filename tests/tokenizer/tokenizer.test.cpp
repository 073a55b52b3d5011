// The Hugging Face tokenizers of ../shared/fixtures/tokenizers against the ids and texts that HF
// `tokenizers` 0.22 + transformers recorded in each cases.json; streaming decode against the
// full decode; malformed tokenizer files against clear errors.
#include <catch2/catch.hpp>

#include "test_support.hpp"
#include "tokenizer/tokenizer.hpp"

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <ctime>
#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <thread>

namespace fs = std::filesystem;
using json = nlohmann::json;
using moert::tokenizer::decode_stream;
using moert::tokenizer::tokenizer;

namespace {

const char* const k_names[] = {"qwen3", "deepseek_v3", "mistral"};

fs::path tokenizer_dir(const std::string& name) {
  fs::path dir = fs::path{MOERT_FIXTURES_DIR} / "tokenizers" / name;
  return fs::exists(dir / "tokenizer.json") ? dir : fs::path{};
}

json read_json(const fs::path& path) {
  std::ifstream in{path};
  return json::parse(in);
}

// Loaded once per binary: loading the big vocabularies is the slow part.
std::shared_ptr<const tokenizer> load(const std::string& name) {
  static std::map<std::string, std::shared_ptr<const tokenizer>> cache;
  if (auto it = cache.find(name); it != cache.end())
    return it->second;
  fs::path dir = tokenizer_dir(name);
  if (dir.empty()) {
    moert::test::skip_whole_binary("../shared/fixtures/tokenizers/" + name + " not found");
    return nullptr;
  }
  auto start = std::chrono::steady_clock::now();
  std::clock_t cpu_start = std::clock();
  auto tok = tokenizer::load(dir.string());
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  double cpu = static_cast<double>(std::clock() - cpu_start) / CLOCKS_PER_SEC;
  INFO(name);
  REQUIRE(tok.ok());
  std::printf("loaded %s in %.3f s (%.3f s of CPU; %zu ids)\n", name.c_str(), secs, cpu, (*tok)->vocab_size());
  cache[name] = *tok;
  return *tok;
}

bool valid_utf8(const std::string& s) {
  std::size_t i = 0;
  auto* p = reinterpret_cast<const unsigned char*>(s.data());
  while (i < s.size()) {
    unsigned char c = p[i];
    std::size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size())
      return false;
    for (std::size_t k = 1; k < n; ++k)
      if ((p[i + k] & 0xC0) != 0x80)
        return false;
    i += n;
  }
  return true;
}

// Streams `ids` one at a time: every piece is whole UTF-8 and the pieces add up to decode(ids).
void check_stream(const std::shared_ptr<const tokenizer>& tok, const std::vector<std::int32_t>& ids,
                  bool skip_special = false) {
  decode_stream stream{tok, skip_special};
  std::string joined;
  for (auto id : ids) {
    std::string piece = stream.push(id);
    INFO("piece after id " << id << ": " << json(piece).dump());
    CHECK(valid_utf8(piece));
    joined += piece;
  }
  std::string last = stream.flush();
  CHECK(valid_utf8(last));
  joined += last;
  CHECK(joined == tok->decode(ids, skip_special));
}

std::vector<std::int32_t> as_ids(const json& j) {
  return j.get<std::vector<std::int32_t>>();
}

}  // namespace

TEST_CASE("every encode case of cases.json gives HF's ids and decoded text") {
  for (const char* name : k_names) {
    auto tok = load(name);
    if (!tok)
      return;
    json cases = read_json(tokenizer_dir(name) / "cases.json");
    for (const auto& c : cases["encode"]) {
      INFO(name << ": " << c["note"].get<std::string>() << " " << c["text"].dump());
      auto ids = tok->encode(c["text"].get<std::string>(), c["add_special_tokens"].get<bool>());
      CHECK(json(ids).dump() == c["ids"].dump());
      CHECK(tok->decode(as_ids(c["ids"])) == c["decoded"].get<std::string>());
    }
  }
}

TEST_CASE("every decode case of cases.json gives HF's text, special tokens kept") {
  for (const char* name : k_names) {
    auto tok = load(name);
    if (!tok)
      return;
    json cases = read_json(tokenizer_dir(name) / "cases.json");
    for (const auto& c : cases["decode"]) {
      INFO(name << ": " << c["note"].get<std::string>());
      CHECK(tok->decode(as_ids(c["ids"]), false) == c["text"].get<std::string>());
    }
  }
}

TEST_CASE("the rendered chat texts of cases.json encode to HF's ids without added specials") {
  for (const char* name : k_names) {
    auto tok = load(name);
    if (!tok)
      return;
    json cases = read_json(tokenizer_dir(name) / "cases.json");
    for (const auto& c : cases["chat"]) {
      if (!c.contains("text"))
        continue;
      INFO(name << ": " << c["note"].get<std::string>());
      CHECK(json(tok->encode(c["text"].get<std::string>(), false)).dump() == c["ids"].dump());
    }
  }
}

// 600 random texts (scripts of many kinds, combining marks, odd whitespace, emoji, added tokens
// and look-alikes) and 200 random id lists, as HF tokenizers 0.22.2 answered them
// (tests/tokenizer/hf_reference/make_reference.js).
TEST_CASE("random texts and ids give exactly what HF tokenizers gives") {
  fs::path ref_dir = moert::test::source_dir() / "tests" / "tokenizer" / "hf_reference";
  json texts = read_json(ref_dir / "texts.json");
  for (const char* name : k_names) {
    auto tok = load(name);
    if (!tok)
      return;
    json ref = read_json(ref_dir / (std::string{name} + ".json"));
    REQUIRE(ref["encode"].size() == texts.size());
    int mismatches = 0;
    for (std::size_t i = 0; i < texts.size(); ++i) {
      const std::string text = texts[i].get<std::string>();
      const json& r = ref["encode"][i];
      auto ids = tok->encode(text, false);
      std::string expected_text = r.contains("decoded") ? r["decoded"].get<std::string>() : text;
      if (json(ids) != r["ids"] || tok->decode(ids) != expected_text) {
        ++mismatches;
        INFO(name << " text " << i << ": " << json(text).dump() << "\n  HF " << r["ids"].dump() << "\n  us "
                  << json(ids).dump());
        CHECK(json(ids).dump() == r["ids"].dump());
      }
      check_stream(tok, ids);
    }
    for (const auto& r : ref["decode"]) {
      auto ids = as_ids(r["ids"]);
      INFO(name << " decode " << r["ids"].dump());
      CHECK(tok->decode(ids, false) == r["text"].get<std::string>());
      CHECK(tok->decode(ids, true) == r["skipped"].get<std::string>());
      check_stream(tok, ids, true);
    }
    CHECK(mismatches == 0);
  }
}

TEST_CASE("special tokens, BOS and EOS come from tokenizer.json and tokenizer_config.json") {
  auto qwen = load("qwen3");
  if (!qwen)
    return;
  CHECK_FALSE(qwen->bos_id());
  CHECK(qwen->eos_token() == "<|im_end|>");
  CHECK(qwen->eos_id() == 151645);
  CHECK(qwen->vocab_size() == 151669);
  CHECK(qwen->token_to_id("<think>") == 151667);
  CHECK(qwen->is_special(151645));
  CHECK_FALSE(qwen->is_special(151667));  // <think> is added but not special
  CHECK(qwen->id_to_token(9707) == "Hello");
  CHECK_FALSE(qwen->id_to_token(-1));
  CHECK_FALSE(qwen->id_to_token(151669));
  // skip_special_tokens drops <|im_end|> but keeps the non-special <think>
  CHECK(qwen->decode(qwen->encode("<think>a</think><|im_end|>", false), true) == "<think>a</think>");
  // look-alikes are ordinary text
  CHECK(qwen->encode("<|IM_END|>", false).size() > 1);

  auto ds = load("deepseek_v3");
  CHECK(ds->bos_id() == 0);
  CHECK(ds->eos_id() == 1);
  CHECK(ds->chat_variables()["bos_token"] == "<｜begin▁of▁sentence｜>");
  auto mistral = load("mistral");
  CHECK(mistral->bos_id() == 1);
  CHECK(mistral->eos_id() == 2);
  CHECK(mistral->encode("<s>Hello", true) == std::vector<std::int32_t>{1, 1, 22557});
  CHECK(mistral->encode("<s>Hello", false) == std::vector<std::int32_t>{1, 22557});
  CHECK(mistral->decode(std::vector<std::int32_t>{1, 22557, 2}, true) == "Hello");
}

TEST_CASE("Unicode: NFC for qwen3 only, byte fallback and U+FFFD rules per tokenizer") {
  auto qwen = load("qwen3");
  if (!qwen)
    return;
  auto ds = load("deepseek_v3");
  auto mistral = load("mistral");
  std::string nfd = "cafe\xCC\x81", nfc = "caf\xC3\xA9";
  CHECK(qwen->encode(nfd, false) == qwen->encode(nfc, false));
  CHECK(qwen->decode(qwen->encode(nfd, false)) == nfc);
  CHECK(ds->encode(nfd, false) != ds->encode(nfc, false));
  CHECK(mistral->encode(nfd, false) != mistral->encode(nfc, false));
  // NFC on runs: composition, reordering of marks, Hangul jamo, a leading mark, mixed text
  CHECK(qwen->decode(qwen->encode("x a\xCC\x81\xCC\xA3 y", false)) == "x \xE1\xBA\xA1\xCC\x81 y");
  CHECK(qwen->decode(qwen->encode("\xE1\x84\x80\xE1\x85\xA1!", false)) == "\xEA\xB0\x80!");
  CHECK(qwen->decode(qwen->encode("\xCC\x81" "abc", false)) == "\xCC\x81" "abc");
  CHECK(qwen->decode(qwen->encode("caf" "e\xCC\x81 \xE4\xBD\xA0 Zoe\xCC\x88", false)) ==
        "caf\xC3\xA9 \xE4\xBD\xA0 Zo\xC3\xAB");
  // U+F900 is NFC-normalized to U+8C48 by qwen3
  CHECK(qwen->decode(qwen->encode("\xEF\xA4\x80", false)) == "\xE8\xB1\x88");
  // NBSP is whitespace for \s
  auto split = qwen->encode("x \xC2\xA0 y", false);
  CHECK(qwen->decode(split) == "x \xC2\xA0 y");
  CHECK(split.size() == 3);
  // E4 BD: one U+FFFD for byte-level, one per byte for ByteFallback
  auto e4 = qwen->encode("\xE4\xBD\xA0", false);  // 你, possibly one token
  std::vector<std::int32_t> byte_e4_bd;
  for (const char* t : {"\xC3\xA4", "\xC2\xBD"})  // ä ½: the byte-level stand-ins of E4 BD
    byte_e4_bd.push_back(*qwen->token_to_id(t));
  CHECK(qwen->decode(byte_e4_bd) == "\xEF\xBF\xBD");
  CHECK(mistral->decode(std::vector<std::int32_t>{0xE4 + 3, 0xBD + 3}) == "\xEF\xBF\xBD\xEF\xBF\xBD");
  CHECK(mistral->decode(std::vector<std::int32_t>{0xE4 + 3, 0xBD + 3, 0xA0 + 3}) == "\xE4\xBD\xA0");
  // a valid byte followed by a bad one: the whole run is replaced, byte by byte
  CHECK(mistral->decode(std::vector<std::int32_t>{0x41 + 3, 0xE4 + 3, 22557}) ==
        "\xEF\xBF\xBD\xEF\xBF\xBD Hello");
  // invalid UTF-8 input is replaced before tokenizing rather than crashing
  CHECK(qwen->decode(qwen->encode("a\xFF" "b", false)) == "a\xEF\xBF\xBD" "b");
}

TEST_CASE("decode_stream: the pieces add up to the full decode and never split a character") {
  for (const char* name : k_names) {
    auto tok = load(name);
    if (!tok)
      return;
    json cases = read_json(tokenizer_dir(name) / "cases.json");
    for (const auto& c : cases["encode"]) {
      INFO(name << " encode: " << c["note"].get<std::string>());
      check_stream(tok, as_ids(c["ids"]));
      check_stream(tok, as_ids(c["ids"]), true);
    }
    for (const auto& c : cases["decode"]) {
      INFO(name << " decode: " << c["note"].get<std::string>());
      check_stream(tok, as_ids(c["ids"]));
    }
    // A long text: the stream cuts its window back as it goes.
    std::string text;
    for (int i = 0; i < 40; ++i)
      text += "Step " + std::to_string(i) + ": 你好，世界！ I love pizza 🍕 and 👍🏽! café\n";
    INFO(name << " long text");
    check_stream(tok, tok->encode(text, true));

    // Random ids, byte tokens and special tokens included: still exact.
    std::mt19937 rng{42};
    std::uniform_int_distribution<std::int32_t> any(0, static_cast<std::int32_t>(tok->vocab_size()) - 1);
    std::uniform_int_distribution<std::int32_t> low(0, 300);
    for (int round = 0; round < 30; ++round) {
      std::vector<std::int32_t> ids;
      for (int i = 0; i < 40; ++i) {
        std::int32_t id = (i % 3 == 0) ? any(rng) : low(rng);
        if (tok->id_to_token(id))
          ids.push_back(id);
      }
      INFO(name << " random round " << round);
      check_stream(tok, ids);
    }
  }
}

TEST_CASE("decode_stream holds back an incomplete UTF-8 character until its last byte") {
  auto mistral = load("mistral");
  if (!mistral)
    return;
  decode_stream stream{mistral};
  CHECK(stream.push(22557) == "Hello");
  CHECK(stream.push(0xE4 + 3).empty());
  CHECK(stream.push(0xBD + 3).empty());
  std::string got = stream.push(0xA0 + 3);
  got += stream.push(1526);
  CHECK(got == "\xE4\xBD\xA0 world");

  auto qwen = load("qwen3");
  auto ids = qwen->encode(" 🍕", false);  // " " + four bytes, over three tokens
  REQUIRE(ids == std::vector<std::int32_t>{11162, 235, 243});
  decode_stream q{qwen};
  CHECK(q.push(ids[0]) == " ");
  CHECK(q.push(ids[1]).empty());
  CHECK(q.push(ids[2]) == "🍕");
  CHECK(q.flush().empty());
  // given up at the end as U+FFFD, as the full decode does
  decode_stream cut{qwen};
  CHECK(cut.push(ids[0]) == " ");
  CHECK(cut.push(ids[1]).empty());
  CHECK(cut.flush() == "\xEF\xBF\xBD");
  CHECK(qwen->decode(std::vector<std::int32_t>{ids[0], ids[1]}) == " \xEF\xBF\xBD");
}

TEST_CASE("one tokenizer encodes and decodes on many threads at once, same results") {
  for (const char* name : k_names) {
    auto tok = load(name);
    if (!tok)
      return;
    std::vector<std::string> texts;
    for (int i = 0; i < 16; ++i)
      texts.push_back("Thread text " + std::to_string(i * 7919) + ": 你好 café 🍕 don't <|im_end|> " +
                      std::string(static_cast<std::size_t>(i), 'x') + "\n\n  end");
    std::vector<std::vector<std::int32_t>> expected;
    for (const auto& t : texts)
      expected.push_back(tok->encode(t, true));
    std::atomic<int> mismatches{0};
    std::vector<std::thread> threads;
    for (int th = 0; th < 4; ++th)
      threads.emplace_back([&, th] {
        for (int rep = 0; rep < 50; ++rep)
          for (std::size_t i = 0; i < texts.size(); ++i) {
            std::size_t k = (i + th * 5 + rep) % texts.size();
            auto ids = tok->encode(texts[k], true);
            if (ids != expected[k] || tok->decode(ids) != tok->decode(expected[k]))
              ++mismatches;
          }
      });
    for (auto& t : threads)
      t.join();
    INFO(name);
    CHECK(mismatches.load() == 0);
  }
}

// -- malformed input --------------------------------------------------------------------------------

namespace {

fs::path scratch(const std::string& name) {
  fs::path dir = fs::temp_directory_path() / ("moert_tokenizer_test_" + std::to_string(::getpid())) / name;
  fs::create_directories(dir);
  return dir;
}

// A tiny byte-level-free BPE over "a", "b", "ab".
json tiny() {
  return json::parse(R"({
    "version": "1.0", "added_tokens": [{"id": 3, "content": "<eos>", "special": true,
      "lstrip": false, "rstrip": false, "normalized": false, "single_word": false}],
    "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}})");
}

std::string load_error(const json& tokenizer_json, const std::string& name) {
  fs::path dir = scratch(name);
  std::ofstream{dir / "tokenizer.json"} << tokenizer_json.dump();
  auto tok = tokenizer::load(dir.string());
  REQUIRE_FALSE(tok.ok());
  return tok.err().what();
}

}  // namespace

TEST_CASE("a tiny tokenizer.json works; malformed ones give errors naming the file and key") {
  {
    fs::path dir = scratch("tiny");
    std::ofstream{dir / "tokenizer.json"} << tiny().dump();
    auto tok = tokenizer::load(dir.string());
    REQUIRE(tok.ok());
    CHECK((*tok)->encode("abab<eos>a", false) == std::vector<std::int32_t>{2, 2, 3, 0});
    CHECK((*tok)->decode(std::vector<std::int32_t>{2, 0, 3}) == "ab a <eos>");  // no decoder: joined by " "
  }
  {
    auto t = tiny();
    t["model"]["merges"] = json::parse(R"([["a", "b"]])");
    fs::path dir = scratch("tiny_array_merges");
    std::ofstream{dir / "tokenizer.json"} << t.dump();
    auto tok = tokenizer::load(dir.string());
    REQUIRE(tok.ok());
    CHECK((*tok)->encode("ab", false) == std::vector<std::int32_t>{2});
  }

  {
    // clean_up_tokenization_spaces: transformers' replacements, also when streamed
    auto t = tiny();
    t["model"]["vocab"] = json::parse(R"({"a": 0, "b": 1, "ab": 2, ".": 4, "'": 5, "s": 6, "n't": 7, "?": 8})");
    fs::path dir = scratch("clean_up");
    std::ofstream{dir / "tokenizer.json"} << t.dump();
    std::ofstream{dir / "tokenizer_config.json"} << R"({"clean_up_tokenization_spaces": true})";
    auto tok = tokenizer::load(dir.string());
    REQUIRE(tok.ok());
    CHECK((*tok)->decode(std::vector<std::int32_t>{2, 4, 0, 5, 6, 1, 7, 8}) == "ab. a's bn't?");
    std::mt19937 rng{7};
    const std::int32_t pool[] = {0, 1, 2, 4, 5, 5, 5, 6, 7, 8};  // many "'" to chain " ' "
    std::uniform_int_distribution<int> pick(0, 9);
    for (int round = 0; round < 50; ++round) {
      std::vector<std::int32_t> ids;
      for (int i = 0; i < 30; ++i)
        ids.push_back(pool[pick(rng)]);
      INFO("round " << round);
      check_stream(*tok, ids);
    }
  }

  {
    // Metaspace (prepend_scheme first: not after an added token) and its decoder
    auto t = json::parse(R"({"added_tokens": [{"id": 5, "content": "<x>", "special": false,
        "lstrip": false, "rstrip": false, "normalized": false, "single_word": false}],
      "normalizer": null, "post_processor": null,
      "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": true},
      "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": true},
      "model": {"type": "BPE", "vocab": {"\u2581a": 0, "\u2581b": 1, "a": 2, "b": 3, "\u2581": 4},
                "merges": ["\u2581 a", "\u2581 b"]}})");
    fs::path dir = scratch("metaspace");
    std::ofstream{dir / "tokenizer.json"} << t.dump();
    auto tok = tokenizer::load(dir.string());
    REQUIRE(tok.ok());
    CHECK((*tok)->encode("a b", false) == std::vector<std::int32_t>{0, 1});
    CHECK((*tok)->encode("<x>a b", false) == std::vector<std::int32_t>{5, 2, 1});
    CHECK((*tok)->decode(std::vector<std::int32_t>{0, 1}) == "a b");
    CHECK((*tok)->decode(std::vector<std::int32_t>{5, 2, 1}) == "<x>a b");
  }
  for (auto [behavior, expected] : {std::pair{"Isolated", std::vector<std::int32_t>{0, 4, 1}},
                                    std::pair{"MergedWithPrevious", std::vector<std::int32_t>{5, 1}},
                                    std::pair{"Removed", std::vector<std::int32_t>{0, 1}},
                                    std::pair{"Contiguous", std::vector<std::int32_t>{0, 4, 1}}}) {
    auto t = tiny();
    t["model"]["vocab"] = json::parse(R"({"a": 0, "b": 1, "ab": 2, "-": 4, "a-": 5})");
    t["model"]["merges"] = json::parse(R"(["a b", "a -"])");
    t["pre_tokenizer"] = json{{"type", "Split"}, {"pattern", {{"String", "-"}}}, {"behavior", behavior}};
    fs::path dir = scratch(std::string{"split_"} + behavior);
    std::ofstream{dir / "tokenizer.json"} << t.dump();
    auto tok = tokenizer::load(dir.string());
    REQUIRE(tok.ok());
    INFO(behavior);
    CHECK((*tok)->encode("a-b", false) == expected);
  }

  auto missing = tokenizer::load((scratch("empty")).string());
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.err().what().find("tokenizer.json") != std::string::npos);

  {
    fs::path dir = scratch("truncated");
    std::ofstream{dir / "tokenizer.json"} << tiny().dump().substr(0, 50);
    auto tok = tokenizer::load(dir.string());
    REQUIRE_FALSE(tok.ok());
    CHECK(tok.err().what().find("malformed JSON") != std::string::npos);
    CHECK(tok.err().what().find("tokenizer.json") != std::string::npos);
  }

  auto t = tiny();
  t["model"]["type"] = "Unigram";
  CHECK(load_error(t, "unigram").find("model.type") != std::string::npos);
  t = tiny();
  t["normalizer"] = json{{"type", "BertNormalizer"}};
  CHECK(load_error(t, "normalizer").find("normalizer.type") != std::string::npos);
  t = tiny();
  t["pre_tokenizer"] = json::parse(R"({"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}]})");
  CHECK(load_error(t, "pre").find("pre_tokenizer.pretokenizers[0].type") != std::string::npos);
  t = tiny();
  t["decoder"] = json{{"type", "WordPiece"}};
  CHECK(load_error(t, "decoder").find("decoder.type") != std::string::npos);
  t = tiny();
  t["model"]["merges"] = json::parse(R"(["a c"])");
  CHECK(load_error(t, "merge").find("model.merges[0]") != std::string::npos);
  t = tiny();
  t["model"]["merges"] = json::parse(R"(["abc"])");
  CHECK(load_error(t, "merge_shape").find("model.merges[0]") != std::string::npos);
  t = tiny();
  t["model"]["vocab"] = json::array();
  CHECK(load_error(t, "vocab").find("model.vocab") != std::string::npos);
  t = tiny();
  t["pre_tokenizer"] = json::parse(R"({"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated"})");
  CHECK(load_error(t, "regex").find("pre_tokenizer.pattern.Regex") != std::string::npos);
  t = tiny();
  t["added_tokens"][0]["id"] = "three";
  CHECK(load_error(t, "added").find("added_tokens[0].id") != std::string::npos);
  t = tiny();
  t["model"] = 7;
  CHECK(load_error(t, "model").find("model") != std::string::npos);
  {
    fs::path dir = scratch("bad_config");
    std::ofstream{dir / "tokenizer.json"} << tiny().dump();
    std::ofstream{dir / "tokenizer_config.json"} << R"({"eos_token": "<nope>"})";
    auto tok = tokenizer::load(dir.string());
    REQUIRE_FALSE(tok.ok());
    CHECK(tok.err().what().find("tokenizer_config.json: eos_token") != std::string::npos);
  }
  fs::remove_all(scratch("").parent_path());
}

TEST_CASE("encode throughput", "[.][bench]") {
  for (const char* name : k_names) {
    auto tok = load(name);
    if (!tok)
      return;
    std::string text;
    for (int i = 0; text.size() < 64 * 1024; ++i)
      text += "Paragraph " + std::to_string(i) +
              ": The quick brown fox jumps over the lazy dog, don't it? 你好，世界！今天天气很好。 "
              "I love pizza 🍕 and 👍🏽! café 1234567890\n\tcode(x) { return x * 2; }\n";
    std::size_t tokens = 0;
    auto start = std::chrono::steady_clock::now();
    std::clock_t cpu_start = std::clock();
    int reps = 0;
    double secs = 0;
    do {
      tokens += tok->encode(text, false).size();
      ++reps;
      secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    } while (secs < 1.0);
    double cpu = static_cast<double>(std::clock() - cpu_start) / CLOCKS_PER_SEC;
    // CPU time too: on a shared machine the wall clock also counts other processes.
    std::printf("%-12s encode %.2f MB/s wall, %.2f MB/s of CPU time (%.0f tokens/s wall) over %zu bytes x %d\n",
                name, text.size() * reps / secs / 1e6, text.size() * reps / cpu / 1e6, tokens / secs, text.size(),
                reps);
  }
}
