// Stop strings cut exactly across token boundaries, held-back text, and UTF-8 never split.
#include <catch2/catch.hpp>

#include "server/text_stream.hpp"
#include "test_support.hpp"

#include <map>

using namespace moert::server;

namespace {

// A detokenizer whose ids stand for fixed strings (bytes, possibly partial UTF-8 characters,
// which it holds back the way tokenizer::decode_stream does).
class table_detokenizer final : public detokenizer {
public:
  explicit table_detokenizer(std::map<std::int32_t, std::string> table) : table_(std::move(table)) {}
  std::string push(std::int32_t id) override {
    bytes_ += table_.at(id);
    std::size_t complete = complete_prefix(bytes_);
    std::string out = bytes_.substr(0, complete);
    bytes_.erase(0, complete);
    return out;
  }
  std::string flush() override {
    std::string out = bytes_.empty() ? "" : "\xEF\xBF\xBD";
    bytes_.clear();
    return out;
  }
  std::string token_text(std::int32_t id) const override { return table_.at(id); }

  static std::size_t complete_prefix(const std::string& s) {
    std::size_t i = 0;
    while (i < s.size()) {
      unsigned char c = static_cast<unsigned char>(s[i]);
      std::size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : 4;
      if (i + len > s.size())
        break;
      i += len;
    }
    return i;
  }

private:
  std::map<std::int32_t, std::string> table_;
  std::string bytes_;
};

struct run_result {
  std::vector<std::string> pieces;
  std::string text;
  bool stopped = false;
};

run_result run(const std::map<std::int32_t, std::string>& table, const std::vector<std::int32_t>& ids,
               std::vector<std::string> stops) {
  text_stream ts{std::make_unique<table_detokenizer>(table), std::move(stops)};
  run_result out;
  for (std::int32_t id : ids) {
    out.pieces.push_back(ts.push(id));
    if (ts.stopped())
      break;
  }
  out.pieces.push_back(ts.finish());
  out.stopped = ts.stopped();
  for (const auto& p : out.pieces)
    out.text += p;
  return out;
}

bool valid_utf8(const std::string& s) {
  return table_detokenizer::complete_prefix(s) == s.size();
}

}  // namespace

TEST_CASE("a stop string split across tokens is cut exactly and left out") {
  std::map<std::int32_t, std::string> t = {{1, "Hello"}, {2, " wo"}, {3, "rld"}, {4, "!"}, {5, " END"}, {6, "ING"}};
  auto r = run(t, {1, 2, 3, 4}, {"world"});
  CHECK(r.stopped);
  CHECK(r.text == "Hello ");
  // " wo" could start "world": held back until "rld" decides it.
  CHECK(r.pieces[0] == "Hello");
  CHECK(r.pieces[1] == " ");
  CHECK(r.pieces[2] == "");
  // A prefix that does not complete is released once it cannot match any more.
  r = run(t, {1, 2, 4}, {"world"});
  CHECK(!r.stopped);
  CHECK(r.text == "Hello wo!");
  CHECK(r.pieces[1] == " ");
  CHECK(r.pieces[2] == "wo!");
  // Still pending at the end: flushed.
  r = run(t, {1, 2}, {"world"});
  CHECK(r.text == "Hello wo");
  CHECK(r.pieces.back() == "wo");
}

TEST_CASE("the earliest of several stop strings wins; text after it never comes out") {
  std::map<std::int32_t, std::string> t = {{1, "abc"}, {2, "def"}, {3, "ghi"}};
  CHECK(run(t, {1, 2, 3}, {"fg", "cd"}).text == "ab");
  CHECK(run(t, {1, 2, 3}, {"efgh", "fg"}).text == "abcd");
  CHECK(run(t, {1, 2, 3}, {"xyz"}).text == "abcdefghi");
  CHECK(run(t, {1, 2, 3}, {}).text == "abcdefghi");
  // The stop string inside one token.
  CHECK(run(t, {1, 2, 3}, {"e"}).text == "abcd");
  // At the very start.
  auto r = run(t, {1, 2, 3}, {"ab"});
  CHECK(r.stopped);
  CHECK(r.text.empty());
}

TEST_CASE("UTF-8 characters split across tokens are never released in halves") {
  // "é" = C3 A9, "世" = E4 B8 96, emoji U+1F600 = F0 9F 98 80, each spread over tokens.
  std::map<std::int32_t, std::string> t = {{1, "caf\xC3"}, {2, "\xA9 "}, {3, "\xE4"}, {4, "\xB8"}, {5, "\x96!"},
                                           {6, "\xF0\x9F"}, {7, "\x98\x80"}};
  auto r = run(t, {1, 2, 3, 4, 5, 6, 7}, {"!x"});
  for (const auto& p : r.pieces) {
    INFO(p);
    CHECK(valid_utf8(p));
  }
  CHECK(r.text == "caf\xC3\xA9 \xE4\xB8\x96!\xF0\x9F\x98\x80");
  // A stop string made of a multi-byte character, arriving byte by byte.
  r = run(t, {1, 2, 3, 4, 5}, {"\xE4\xB8\x96"});
  CHECK(r.stopped);
  CHECK(r.text == "caf\xC3\xA9 ");
  for (const auto& p : r.pieces)
    CHECK(valid_utf8(p));
  // An incomplete character at the end becomes U+FFFD, as a full decode gives.
  r = run(t, {1, 2, 6}, {});
  CHECK(r.text == "caf\xC3\xA9 \xEF\xBF\xBD");
}

TEST_CASE("without a tokenizer, text is the ids separated by spaces, and stops apply to it") {
  text_stream ts{make_id_detokenizer(), {" 7"}};
  std::string text;
  for (std::int32_t id : {5, 17, 3})
    text += ts.push(id);
  text += ts.finish();
  CHECK(text == "5 17 3");
  text_stream cut{make_id_detokenizer(), {" 7"}};
  text.clear();
  for (std::int32_t id : {5, 7, 3})
    text += cut.push(id);
  CHECK(cut.stopped());
  CHECK(text == "5");
}

TEST_CASE("with the Qwen3 tokenizer: streamed pieces are whole characters and join to the full decode") {
  if (!std::filesystem::exists(std::filesystem::path{MOERT_FIXTURES_DIR} / "tokenizers/qwen3/tokenizer.json")) {
    moert::test::skip_whole_binary("fixtures/tokenizers/qwen3 not found");
    return;
  }
  auto tok = moert::tokenizer::tokenizer::load(std::string{MOERT_FIXTURES_DIR} + "/tokenizers/qwen3");
  REQUIRE(tok);
  std::string input = "Grüße, 世界! 😀 stop here and more";
  auto ids = (*tok)->encode(input, false);
  text_stream ts{make_tokenizer_detokenizer(*tok), {"here"}};
  std::string text;
  for (std::int32_t id : ids) {
    std::string piece = ts.push(id);
    CHECK(valid_utf8(piece));
    text += piece;
    if (ts.stopped())
      break;
  }
  text += ts.finish();
  CHECK(ts.stopped());
  CHECK(text == "Grüße, 世界! 😀 stop ");
  text_stream all{make_tokenizer_detokenizer(*tok), {}};
  text.clear();
  for (std::int32_t id : ids)
    text += all.push(id);
  text += all.finish();
  CHECK(text == (*tok)->decode(ids, true));
}
