#include "tokenizer/tokenizer.hpp"

#include <nlohmann/json.hpp>
#include <oniguruma.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <utility>

namespace moert::tokenizer {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// -- UTF-8 ----------------------------------------------------------------------------------------

enum class utf8_scan { valid, invalid, truncated };

// Looks at the sequence starting at p[0]. valid: *len is its length. invalid: *len is the length
// of the maximal subpart of a valid sequence (at least 1), replaced by one U+FFFD as Rust's
// from_utf8_lossy and Python's errors="replace" do. truncated: the bytes ran out while the
// sequence could still become valid; *len is what is there.
utf8_scan scan_utf8(const unsigned char* p, std::size_t n, std::size_t* len) {
  unsigned char c = p[0];
  if (c < 0x80) {
    *len = 1;
    return utf8_scan::valid;
  }
  std::size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    need = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 3;
    if (c == 0xE0)
      lo = 0xA0;
    else if (c == 0xED)
      hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 4;
    if (c == 0xF0)
      lo = 0x90;
    else if (c == 0xF4)
      hi = 0x8F;
  } else {
    *len = 1;
    return utf8_scan::invalid;
  }
  std::size_t i = 1;
  for (; i < need; ++i) {
    if (i >= n) {
      *len = i;
      return utf8_scan::truncated;
    }
    unsigned char b = p[i];
    bool ok = i == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) {
      *len = i;
      return utf8_scan::invalid;
    }
  }
  *len = need;
  return utf8_scan::valid;
}

const char k_replacement[] = "\xEF\xBF\xBD";  // U+FFFD

// Appends `bytes` with one U+FFFD per maximal invalid subpart. Returns the offset in `out` where a
// trailing truncated sequence was written (out.size() when there is none): text before it can
// no longer change when more bytes follow.
std::size_t append_lossy(std::string& out, std::string_view bytes) {
  auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  std::size_t n = bytes.size(), i = 0, stable = std::string::npos;
  out.reserve(out.size() + n);
  while (i < n) {
    std::size_t run = i;
    while (run < n && p[run] < 0x80)
      ++run;
    out.append(bytes.data() + i, run - i);
    i = run;
    if (i >= n)
      break;
    std::size_t len;
    switch (scan_utf8(p + i, n - i, &len)) {
      case utf8_scan::valid:
        out.append(bytes.data() + i, len);
        break;
      case utf8_scan::invalid:
        out += k_replacement;
        break;
      case utf8_scan::truncated:
        stable = out.size();
        out += k_replacement;
        break;
    }
    i += len;
  }
  return stable == std::string::npos ? out.size() : stable;
}

bool is_valid_utf8(std::string_view s) {
  auto* p = reinterpret_cast<const unsigned char*>(s.data());
  for (std::size_t i = 0, len; i < s.size(); i += len)
    if (scan_utf8(p + i, s.size() - i, &len) != utf8_scan::valid)
      return false;
  return true;
}

bool is_ascii(std::string_view s) {
  for (unsigned char c : s)
    if (c >= 0x80)
      return false;
  return true;
}

// Decodes the code point at s[i] (s is valid UTF-8) and advances i.
std::int32_t next_cp(std::string_view s, std::size_t& i) {
  utf8proc_int32_t cp = 0;
  auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                            static_cast<utf8proc_ssize_t>(s.size() - i), &cp);
  i += n > 0 ? static_cast<std::size_t>(n) : 1;
  return cp;
}

// The code point that ends at s[end) (s valid UTF-8); sets *start to where it begins.
std::int32_t prev_cp(std::string_view s, std::size_t end, std::size_t* start) {
  std::size_t b = end - 1;
  while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80)
    --b;
  *start = b;
  std::size_t i = b;
  return next_cp(s, i);
}

void append_cp(std::string& out, std::int32_t cp) {
  utf8proc_uint8_t buf[4];
  auto n = utf8proc_encode_char(cp, buf);
  out.append(reinterpret_cast<const char*>(buf), static_cast<std::size_t>(n));
}

// Rust's char::is_whitespace (the White_Space property).
bool is_whitespace_cp(std::int32_t c) {
  if ((c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85)
    return true;
  if (c < 0xA0)
    return false;
  auto cat = utf8proc_category(c);
  return cat == UTF8PROC_CATEGORY_ZS || cat == UTF8PROC_CATEGORY_ZL || cat == UTF8PROC_CATEGORY_ZP;
}

bool is_numeric_cp(std::int32_t c) {
  auto cat = utf8proc_category(c);
  return cat == UTF8PROC_CATEGORY_ND || cat == UTF8PROC_CATEGORY_NL || cat == UTF8PROC_CATEGORY_NO;
}

bool is_word_cp(std::int32_t c) {
  if (c == '_')
    return true;
  auto cat = utf8proc_category(c);
  return (cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO) ||
         (cat >= UTF8PROC_CATEGORY_ND && cat <= UTF8PROC_CATEGORY_NO) ||
         (cat >= UTF8PROC_CATEGORY_MN && cat <= UTF8PROC_CATEGORY_ME);
}

// -- GPT-2 byte <-> unicode map -------------------------------------------------------------------

struct byte_map {
  std::array<std::string, 256> to_text;  // byte -> UTF-8 of its stand-in code point
  std::array<std::int16_t, 324> to_byte;  // stand-in code point -> byte, -1 when none

  byte_map() {
    to_byte.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      int cp = printable ? b : 256 + extra++;
      to_text[b].clear();
      append_cp(to_text[b], cp);
      to_byte[cp] = static_cast<std::int16_t>(b);
    }
  }
};

const byte_map& bytes_map() {
  static const byte_map map;
  return map;
}

// The bytes a byte-level token stands for; a token with a character outside the map (an added
// token such as "<｜User｜>") stands for its own UTF-8, as HF's ByteLevel decoder does.
std::string byte_level_bytes(std::string_view token) {
  const auto& map = bytes_map();
  std::string out;
  out.reserve(token.size());
  for (std::size_t i = 0; i < token.size();) {
    std::int32_t cp = next_cp(token, i);
    if (cp < 0 || cp >= static_cast<std::int32_t>(map.to_byte.size()) || map.to_byte[cp] < 0)
      return std::string{token};
    out.push_back(static_cast<char>(map.to_byte[cp]));
  }
  return out;
}

// -- Oniguruma --------------------------------------------------------------------------------------

void init_oniguruma() {
  static std::once_flag once;
  std::call_once(once, [] {
    OnigEncoding encodings[] = {ONIG_ENCODING_UTF8};
    onig_initialize(encodings, 1);
  });
}

// A compiled pattern. onig_search on a shared regex_t is safe from many threads as long as each
// call has its own region (Oniguruma 6.x keeps no match state in the regex).
class onig_pattern {
public:
  static result<std::shared_ptr<const onig_pattern>> compile(const std::string& pattern,
                                                             const std::string& where) {
    init_oniguruma();
    regex_t* reg = nullptr;
    OnigErrorInfo info;
    auto* begin = reinterpret_cast<const OnigUChar*>(pattern.data());
    int rc = onig_new(&reg, begin, begin + pattern.size(), ONIG_OPTION_NONE, ONIG_ENCODING_UTF8,
                      ONIG_SYNTAX_DEFAULT, &info);
    if (rc != ONIG_NORMAL) {
      OnigUChar msg[ONIG_MAX_ERROR_MESSAGE_LEN];
      onig_error_code_to_str(msg, rc, &info);
      return make_error(error_code::invalid_config,
                        where + ": bad regex: " + reinterpret_cast<char*>(msg));
    }
    return std::shared_ptr<const onig_pattern>{new onig_pattern{reg}};
  }

  ~onig_pattern() { onig_free(reg_); }
  onig_pattern(const onig_pattern&) = delete;
  onig_pattern& operator=(const onig_pattern&) = delete;

  // Every non-overlapping match, left to right, as [begin, end) byte offsets; an empty match
  // advances one character.
  void find_all(std::string_view text, std::vector<std::pair<std::size_t, std::size_t>>& out) const {
    out.clear();
    OnigRegion* region = onig_region_new();
    auto* str = reinterpret_cast<const OnigUChar*>(text.data());
    auto* end = str + text.size();
    std::size_t pos = 0;
    while (pos <= text.size()) {
      int r = onig_search(reg_, str, end, str + pos, end, region, ONIG_OPTION_NONE);
      if (r < 0)
        break;
      auto b = static_cast<std::size_t>(region->beg[0]);
      auto e = static_cast<std::size_t>(region->end[0]);
      if (e == b) {
        if (b >= text.size())
          break;
        std::size_t next = b;
        next_cp(text, next);
        pos = next;
        continue;  // HF drops empty matches (an empty split is filtered out anyway)
      }
      out.emplace_back(b, e);
      pos = e;
    }
    onig_region_free(region, 1);
  }

private:
  explicit onig_pattern(regex_t* reg) : reg_{reg} {}
  regex_t* reg_;
};

using pattern_ptr = std::shared_ptr<const onig_pattern>;

// -- JSON access with messages naming file and key -------------------------------------------------

error config_error(const std::string& where, const std::string& what) {
  return make_error(error_code::invalid_config, where + ": " + what);
}

error unsupported_error(const std::string& where, const std::string& what) {
  return make_error(error_code::unsupported, where + ": " + what);
}

result<std::string> get_string(const json& obj, const char* key, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || !it->is_string())
    return config_error(where + "." + key, "expected a string");
  return it->get<std::string>();
}

bool get_bool(const json& obj, const char* key, bool fallback) {
  auto it = obj.find(key);
  return it != obj.end() && it->is_boolean() ? it->get<bool>() : fallback;
}

// A pattern object {"String": s} or {"Regex": r}.
struct pattern_spec {
  bool is_regex = false;
  std::string text;
};

result<pattern_spec> get_pattern(const json& obj, const std::string& where) {
  auto it = obj.find("pattern");
  if (it == obj.end() || !it->is_object())
    return config_error(where + ".pattern", "expected {\"String\": …} or {\"Regex\": …}");
  if (auto s = it->find("String"); s != it->end() && s->is_string())
    return pattern_spec{false, s->get<std::string>()};
  if (auto r = it->find("Regex"); r != it->end() && r->is_string())
    return pattern_spec{true, r->get<std::string>()};
  return config_error(where + ".pattern", "expected {\"String\": …} or {\"Regex\": …}");
}

void find_literal(std::string_view text, std::string_view needle,
                  std::vector<std::pair<std::size_t, std::size_t>>& out) {
  out.clear();
  if (needle.empty())
    return;
  for (std::size_t pos = text.find(needle); pos != std::string_view::npos;
       pos = text.find(needle, pos + needle.size()))
    out.emplace_back(pos, pos + needle.size());
}

// -- normalizers ------------------------------------------------------------------------------------

struct normalizer_step {
  enum class kind { nfc, nfd, nfkc, nfkd, prepend, replace, lowercase, strip };
  kind k;
  std::string text{};     // prepend: the prefix; replace: the literal pattern
  std::string content{};  // replace: the replacement
  pattern_ptr regex{};    // replace with a Regex pattern
  bool left = false, right = false;  // strip
};

std::string utf8proc_transform(const std::string& s, utf8proc_option_t options) {
  if (is_ascii(s))
    return s;  // every normalization form leaves ASCII alone
  utf8proc_uint8_t* dst = nullptr;
  auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                        static_cast<utf8proc_ssize_t>(s.size()), &dst,
                        static_cast<utf8proc_option_t>(options | UTF8PROC_STABLE));
  if (n < 0)
    return s;  // input is valid UTF-8 (encode cleans it), so this does not happen
  std::string out{reinterpret_cast<char*>(dst), static_cast<std::size_t>(n)};
  std::free(dst);
  return out;
}

// NFC, normalizing only the runs that can change. Code points below U+0300 are NFC already,
// are starters and are never the second part of a composition, so the text can be cut before
// each of them; a run that holds a code point >= U+0300 is normalized from the starter before it.
std::string nfc(const std::string& s) {
  bool any = false;
  for (unsigned char c : s)
    any = any || c >= 0xCC;  // lead bytes of U+0300 and above
  if (!any)
    return s;
  std::string out;
  out.reserve(s.size());
  std::size_t pending = 0, candidate = 0, run_start = 0;
  bool in_run = false;
  for (std::size_t i = 0; i < s.size();) {
    std::size_t b = i;
    std::int32_t cp = next_cp(s, i);
    if (cp < 0x300) {
      if (in_run) {
        out += utf8proc_transform(s.substr(run_start, b - run_start), UTF8PROC_COMPOSE);
        pending = b;
        in_run = false;
      }
      candidate = b;
    } else if (!in_run) {
      in_run = true;
      run_start = std::max(candidate, pending);
      out.append(s, pending, run_start - pending);
    }
  }
  if (in_run)
    out += utf8proc_transform(s.substr(run_start), UTF8PROC_COMPOSE);
  else
    out.append(s, pending, std::string::npos);
  return out;
}

void apply_normalizer(const normalizer_step& step, std::string& s) {
  using k = normalizer_step::kind;
  switch (step.k) {
    case k::nfc:
      s = nfc(s);
      break;
    case k::nfd:
      s = utf8proc_transform(s, UTF8PROC_DECOMPOSE);
      break;
    case k::nfkc:
      s = utf8proc_transform(s, static_cast<utf8proc_option_t>(UTF8PROC_COMPOSE | UTF8PROC_COMPAT));
      break;
    case k::nfkd:
      s = utf8proc_transform(s, static_cast<utf8proc_option_t>(UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT));
      break;
    case k::prepend:
      if (!s.empty())
        s.insert(0, step.text);
      break;
    case k::replace: {
      std::vector<std::pair<std::size_t, std::size_t>> hits;
      if (step.regex)
        step.regex->find_all(s, hits);
      else
        find_literal(s, step.text, hits);
      if (hits.empty())
        break;
      std::string out;
      std::size_t prev = 0;
      for (auto [b, e] : hits) {
        out.append(s, prev, b - prev);
        out += step.content;
        prev = e;
      }
      out.append(s, prev, std::string::npos);
      s = std::move(out);
      break;
    }
    case k::lowercase: {
      std::string out;
      for (std::size_t i = 0; i < s.size();)
        append_cp(out, utf8proc_tolower(next_cp(s, i)));
      s = std::move(out);
      break;
    }
    case k::strip: {
      std::size_t b = 0, e = s.size();
      if (step.left)
        while (b < e) {
          std::size_t i = b;
          if (!is_whitespace_cp(next_cp(s, i)))
            break;
          b = i;
        }
      if (step.right)
        while (e > b) {
          std::size_t start;
          if (!is_whitespace_cp(prev_cp(s, e, &start)))
            break;
          e = start;
        }
      s = s.substr(b, e - b);
      break;
    }
  }
}

// {"type": "Sequence", KEY: [...]}: every element parsed in order into `out`.
template <class Step, class Parse>
status parse_sequence(const json& node, const std::string& key, const std::string& where, std::vector<Step>& out,
                      Parse parse) {
  auto it = node.find(key);
  if (it == node.end() || !it->is_array())
    return config_error(where + "." + key, "expected an array");
  for (std::size_t i = 0; i < it->size(); ++i)
    MOERT_TRY(parse((*it)[i], where + "." + key + "[" + std::to_string(i) + "]", out));
  return status::success();
}

status parse_normalizer(const json& node, const std::string& where, std::vector<normalizer_step>& out) {
  if (node.is_null())
    return status::success();
  if (!node.is_object())
    return config_error(where, "expected an object or null");
  auto type = get_string(node, "type", where);
  if (!type)
    return type.err();
  using k = normalizer_step::kind;
  const std::string& t = *type;
  if (t == "Sequence") {
    MOERT_TRY(parse_sequence(node, "normalizers", where, out, parse_normalizer));
  } else if (t == "NFC") {
    out.push_back({k::nfc, {}, {}, {}});
  } else if (t == "NFD") {
    out.push_back({k::nfd, {}, {}, {}});
  } else if (t == "NFKC") {
    out.push_back({k::nfkc, {}, {}, {}});
  } else if (t == "NFKD") {
    out.push_back({k::nfkd, {}, {}, {}});
  } else if (t == "Lowercase") {
    out.push_back({k::lowercase, {}, {}, {}});
  } else if (t == "Prepend") {
    auto p = get_string(node, "prepend", where);
    if (!p)
      return p.err();
    out.push_back({k::prepend, *p, {}, {}});
  } else if (t == "Replace") {
    auto pat = get_pattern(node, where);
    if (!pat)
      return pat.err();
    auto content = get_string(node, "content", where);
    if (!content)
      return content.err();
    normalizer_step step{k::replace, pat->text, *content, {}};
    if (pat->is_regex) {
      auto re = onig_pattern::compile(pat->text, where + ".pattern.Regex");
      if (!re)
        return re.err();
      step.regex = *re;
    }
    out.push_back(std::move(step));
  } else if (t == "Strip") {
    normalizer_step step{k::strip, {}, {}, {}};
    step.left = get_bool(node, "strip_left", true);
    step.right = get_bool(node, "strip_right", true);
    out.push_back(std::move(step));
  } else {
    return unsupported_error(where + ".type", "normalizer '" + t + "' is not supported");
  }
  return status::success();
}

// -- pre-tokenizers ---------------------------------------------------------------------------------

enum class split_behavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };

struct pre_step {
  enum class kind { split, byte_level, metaspace, digits };
  kind k;
  // split
  pattern_ptr regex{};
  std::string literal{};
  split_behavior behavior = split_behavior::isolated;
  bool invert = false;
  // byte_level
  bool add_prefix_space = false;
  // metaspace
  std::string replacement{};
  enum class prepend_scheme { always, first, never } scheme = prepend_scheme::always;
  bool split = true;
  // digits
  bool individual_digits = false;
};

using offsets = std::vector<std::pair<std::size_t, std::size_t>>;

// HF's NormalizedString::split: `hits` are the matches; the gaps between them are pieces too.
void split_by(std::string_view s, const offsets& hits, split_behavior behavior, bool invert,
              std::vector<std::string_view>& out) {
  struct part {
    std::size_t b, e;
    bool match;
  };
  std::vector<part> parts;
  std::size_t prev = 0;
  for (auto [b, e] : hits) {
    if (prev < b)
      parts.push_back({prev, b, invert});
    parts.push_back({b, e, !invert});
    prev = e;
  }
  if (prev < s.size())
    parts.push_back({prev, s.size(), invert});
  if (s.empty())
    return;

  std::vector<part> merged;  // `match` now means "drop"
  switch (behavior) {
    case split_behavior::isolated:
      for (auto p : parts)
        merged.push_back({p.b, p.e, false});
      break;
    case split_behavior::removed:
      merged = parts;
      break;
    case split_behavior::merged_with_previous: {
      bool previous_match = false;
      for (auto p : parts) {
        if (p.match && !previous_match && !merged.empty())
          merged.back().e = p.e;
        else
          merged.push_back({p.b, p.e, false});
        previous_match = p.match;
      }
      break;
    }
    case split_behavior::merged_with_next: {
      bool previous_match = false;
      for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
        if (it->match && !previous_match && !merged.empty())
          merged.back().b = it->b;
        else
          merged.push_back({it->b, it->e, false});
        previous_match = it->match;
      }
      std::reverse(merged.begin(), merged.end());
      break;
    }
    case split_behavior::contiguous: {
      bool previous_match = false;
      bool first = true;
      for (auto p : parts) {
        if (!first && p.match == previous_match)
          merged.back().e = p.e;
        else
          merged.push_back({p.b, p.e, false});
        previous_match = p.match;
        first = false;
      }
      break;
    }
  }
  for (auto p : merged)
    if (!p.match && p.e > p.b)
      out.push_back(s.substr(p.b, p.e - p.b));
}

const char k_gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

result<split_behavior> parse_behavior(const json& node, const std::string& where) {
  auto b = get_string(node, "behavior", where);
  if (!b)
    return b.err();
  if (*b == "Removed")
    return split_behavior::removed;
  if (*b == "Isolated")
    return split_behavior::isolated;
  if (*b == "MergedWithPrevious")
    return split_behavior::merged_with_previous;
  if (*b == "MergedWithNext")
    return split_behavior::merged_with_next;
  if (*b == "Contiguous")
    return split_behavior::contiguous;
  return unsupported_error(where + ".behavior", "unknown split behavior '" + *b + "'");
}

status parse_pre_tokenizer(const json& node, const std::string& where, std::vector<pre_step>& out) {
  if (node.is_null())
    return status::success();
  if (!node.is_object())
    return config_error(where, "expected an object or null");
  auto type = get_string(node, "type", where);
  if (!type)
    return type.err();
  using k = pre_step::kind;
  const std::string& t = *type;
  if (t == "Sequence") {
    MOERT_TRY(parse_sequence(node, "pretokenizers", where, out, parse_pre_tokenizer));
  } else if (t == "Split") {
    pre_step step{k::split};
    auto pat = get_pattern(node, where);
    if (!pat)
      return pat.err();
    if (pat->is_regex) {
      auto re = onig_pattern::compile(pat->text, where + ".pattern.Regex");
      if (!re)
        return re.err();
      step.regex = *re;
    } else {
      step.literal = pat->text;
    }
    auto behavior = parse_behavior(node, where);
    if (!behavior)
      return behavior.err();
    step.behavior = *behavior;
    step.invert = get_bool(node, "invert", false);
    out.push_back(std::move(step));
  } else if (t == "ByteLevel") {
    pre_step step{k::byte_level};
    step.add_prefix_space = get_bool(node, "add_prefix_space", true);
    if (get_bool(node, "use_regex", true)) {
      // The GPT-2 split, applied inside the byte-level step before the byte mapping.
      auto re = onig_pattern::compile(k_gpt2_pattern, where + " (GPT-2 regex)");
      if (!re)
        return re.err();
      step.regex = *re;
    }
    out.push_back(std::move(step));
  } else if (t == "Metaspace") {
    pre_step step{k::metaspace};
    auto r = node.find("replacement");
    step.replacement = r != node.end() && r->is_string() ? r->get<std::string>() : "\xE2\x96\x81";
    std::string scheme = "always";
    if (auto s = node.find("prepend_scheme"); s != node.end() && s->is_string())
      scheme = s->get<std::string>();
    else if (!get_bool(node, "add_prefix_space", true))
      scheme = "never";
    if (scheme == "always")
      step.scheme = pre_step::prepend_scheme::always;
    else if (scheme == "first")
      step.scheme = pre_step::prepend_scheme::first;
    else if (scheme == "never")
      step.scheme = pre_step::prepend_scheme::never;
    else
      return unsupported_error(where + ".prepend_scheme", "unknown value '" + scheme + "'");
    step.split = get_bool(node, "split", true);
    out.push_back(std::move(step));
  } else if (t == "Digits") {
    pre_step step{k::digits};
    step.individual_digits = get_bool(node, "individual_digits", false);
    out.push_back(std::move(step));
  } else {
    return unsupported_error(where + ".type", "pre-tokenizer '" + t + "' is not supported");
  }
  return status::success();
}

// -- decoders -----------------------------------------------------------------------------------------

struct decoder_step {
  enum class kind { byte_level, replace, byte_fallback, fuse, strip, metaspace };
  kind k;
  std::string pattern{}, content{};  // replace; strip: content is the character
  std::size_t start = 0, stop = 0;  // strip
  bool prepend_first = true;        // metaspace: strip the space it put before the first word
};

status parse_decoder(const json& node, const std::string& where, std::vector<decoder_step>& out) {
  if (node.is_null())
    return status::success();
  if (!node.is_object())
    return config_error(where, "expected an object or null");
  auto type = get_string(node, "type", where);
  if (!type)
    return type.err();
  using k = decoder_step::kind;
  const std::string& t = *type;
  if (t == "Sequence") {
    MOERT_TRY(parse_sequence(node, "decoders", where, out, parse_decoder));
  } else if (t == "ByteLevel") {
    out.push_back({k::byte_level});
  } else if (t == "ByteFallback") {
    out.push_back({k::byte_fallback});
  } else if (t == "Fuse") {
    out.push_back({k::fuse});
  } else if (t == "Replace") {
    auto pat = get_pattern(node, where);
    if (!pat)
      return pat.err();
    if (pat->is_regex)
      return unsupported_error(where + ".pattern", "a Regex pattern in the Replace decoder is not supported");
    auto content = get_string(node, "content", where);
    if (!content)
      return content.err();
    out.push_back({k::replace, pat->text, *content});
  } else if (t == "Strip") {
    auto content = get_string(node, "content", where);
    if (!content)
      return content.err();
    std::size_t i = 0;
    if (content->empty() || (next_cp(*content, i), i != content->size()))
      return config_error(where + ".content", "expected one character");
    decoder_step step{k::strip, {}, *content};
    auto num = [&](const char* key) -> std::size_t {
      auto it = node.find(key);
      return it != node.end() && it->is_number_unsigned() ? it->get<std::size_t>() : 0;
    };
    step.start = num("start");
    step.stop = num("stop");
    out.push_back(std::move(step));
  } else if (t == "Metaspace") {
    decoder_step step{k::metaspace};
    auto r = node.find("replacement");
    step.pattern = r != node.end() && r->is_string() ? r->get<std::string>() : "\xE2\x96\x81";
    std::string scheme = "always";
    if (auto s = node.find("prepend_scheme"); s != node.end() && s->is_string())
      scheme = s->get<std::string>();
    else if (!get_bool(node, "add_prefix_space", true))
      scheme = "never";
    step.prepend_first = scheme != "never";
    out.push_back(std::move(step));
  } else {
    return unsupported_error(where + ".type", "decoder '" + t + "' is not supported");
  }
  return status::success();
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  if (from.empty())
    return;
  std::size_t pos = s.find(from);
  if (pos == std::string::npos)
    return;
  std::string out;
  std::size_t prev = 0;
  for (; pos != std::string::npos; pos = s.find(from, prev)) {
    out.append(s, prev, pos - prev);
    out += to;
    prev = pos + from.size();
  }
  out.append(s, prev, std::string::npos);
  s = std::move(out);
}

// "<0xAB>" -> 0xAB, or -1.
int byte_token_value(std::string_view t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>')
    return -1;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9')
      return c - '0';
    if (c >= 'A' && c <= 'F')
      return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
      return c - 'a' + 10;
    return -1;
  };
  int hi = hex(t[3]), lo = hex(t[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

void run_decoder(const decoder_step& step, std::vector<std::string>& tokens) {
  using k = decoder_step::kind;
  switch (step.k) {
    case k::byte_level: {
      std::string bytes;
      for (const auto& t : tokens)
        bytes += byte_level_bytes(t);
      std::string text;
      append_lossy(text, bytes);
      tokens.assign(1, std::move(text));
      break;
    }
    case k::replace:
      for (auto& t : tokens)
        replace_all(t, step.pattern, step.content);
      break;
    case k::byte_fallback: {
      // A run of byte tokens becomes its text when the run is valid UTF-8, else one U+FFFD per
      // byte (HF's ByteFallback, unlike from_utf8_lossy).
      std::vector<std::string> out;
      std::string run;
      std::size_t run_len = 0;
      auto flush = [&] {
        if (run_len == 0)
          return;
        if (is_valid_utf8(run)) {
          out.push_back(run);
        } else {
          for (std::size_t i = 0; i < run_len; ++i)
            out.emplace_back(k_replacement);
        }
        run.clear();
        run_len = 0;
      };
      for (auto& t : tokens) {
        int b = byte_token_value(t);
        if (b >= 0) {
          run.push_back(static_cast<char>(b));
          ++run_len;
        } else {
          flush();
          out.push_back(std::move(t));
        }
      }
      flush();
      tokens = std::move(out);
      break;
    }
    case k::fuse: {
      std::string all;
      for (const auto& t : tokens)
        all += t;
      tokens.assign(1, std::move(all));
      break;
    }
    case k::strip: {
      for (auto& t : tokens) {
        const std::size_t c = step.content.size();
        std::size_t b = 0, e = t.size();
        for (std::size_t n = 0; n < step.start && b + c <= e && t.compare(b, c, step.content) == 0; ++n)
          b += c;
        for (std::size_t n = 0; n < step.stop && e >= b + c && t.compare(e - c, c, step.content) == 0; ++n)
          e -= c;
        t = t.substr(b, e - b);
      }
      break;
    }
    case k::metaspace:
      for (std::size_t i = 0; i < tokens.size(); ++i) {
        replace_all(tokens[i], step.pattern, " ");
        if (i == 0 && step.prepend_first && !tokens[i].empty() && tokens[i][0] == ' ')
          tokens[i].erase(0, 1);
      }
      break;
  }
}

// -- added tokens ----------------------------------------------------------------------------------

struct added_token {
  std::string content;
  std::int32_t id = 0;
  bool special = false, lstrip = false, rstrip = false, normalized = false, single_word = false;
};

// Leftmost-longest matching of the added tokens in a text (HF uses Aho-Corasick with
// MatchKind::LeftmostLongest): a byte trie, walked from each position whose first byte can start
// a token.
class added_matcher {
public:
  void add(const added_token& tok) {
    if (tok.content.empty())
      return;
    int node = 0;
    for (unsigned char c : tok.content) {
      std::uint64_t key = (static_cast<std::uint64_t>(node) << 8) | c;
      auto it = edges_.find(key);
      if (it == edges_.end()) {
        int fresh = static_cast<int>(terminal_.size());
        terminal_.push_back(nullptr);
        edges_.emplace(key, fresh);
        node = fresh;
      } else {
        node = it->second;
      }
    }
    terminal_[node] = &tok;
    first_[static_cast<unsigned char>(tok.content[0])] = true;
  }
  bool empty() const { return terminal_.size() == 1; }

  struct segment {
    std::size_t begin, end;
    const added_token* token;  // nullptr for text
  };

  // Splits `s` into text and token segments (HF's AddedVocabulary::find_matches, with its
  // single_word, lstrip and rstrip rules).
  void split(std::string_view s, std::vector<segment>& out) const {
    out.clear();
    std::size_t start_offset = 0;
    std::size_t pos = 0;
    while (pos < s.size()) {
      if (!first_[static_cast<unsigned char>(s[pos])]) {
        ++pos;
        continue;
      }
      const added_token* best = nullptr;
      std::size_t best_len = 0;
      int node = 0;
      for (std::size_t i = pos; i < s.size(); ++i) {
        std::uint64_t key = (static_cast<std::uint64_t>(node) << 8) | static_cast<unsigned char>(s[i]);
        auto it = edges_.find(key);
        if (it == edges_.end())
          break;
        node = it->second;
        if (terminal_[node]) {
          best = terminal_[node];
          best_len = i + 1 - pos;
        }
      }
      if (!best) {
        ++pos;
        continue;
      }
      std::size_t start = pos, stop = pos + best_len;
      if (best->single_word) {
        std::size_t b;
        bool start_space = start == 0 || !is_word_cp(prev_cp(s, start, &b));
        std::size_t i = stop;
        bool stop_space = stop == s.size() || !is_word_cp(next_cp(s, i));
        if (!start_space || !stop_space) {
          ++pos;
          continue;
        }
      }
      if (best->lstrip) {
        while (start > start_offset) {
          std::size_t b;
          if (!is_whitespace_cp(prev_cp(s, start, &b)))
            break;
          start = b;
        }
      }
      if (best->rstrip) {
        while (stop < s.size()) {
          std::size_t i = stop;
          if (!is_whitespace_cp(next_cp(s, i)))
            break;
          stop = i;
        }
      }
      if (start_offset < start)
        out.push_back({start_offset, start, nullptr});
      out.push_back({start, stop, best});
      start_offset = stop;
      pos = stop;
    }
    if (start_offset < s.size() || out.empty())
      out.push_back({start_offset, s.size(), nullptr});
  }

private:
  std::unordered_map<std::uint64_t, int> edges_;
  std::vector<const added_token*> terminal_{nullptr};
  std::array<bool, 256> first_{};
};

// -- BPE ----------------------------------------------------------------------------------------------

struct string_hash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

// The model's vocabulary: id -> text, and text -> id by open addressing over the ids (no node
// per entry; 150k tokens load and look up several times faster than a std::unordered_map).
class vocab_table {
public:
  // entries: (text, id); a repeated text keeps its last id, as a JSON object does.
  void build(std::vector<std::pair<std::string, std::int64_t>>&& entries) {
    std::int64_t max_id = -1;
    for (const auto& e : entries)
      max_id = std::max(max_id, e.second);
    tokens_.assign(static_cast<std::size_t>(max_id + 1), {});
    present_.assign(tokens_.size(), false);
    std::size_t cap = 16;
    while (cap < entries.size() * 2)
      cap <<= 1;
    slots_.assign(cap, slot{0, -1});
    mask_ = cap - 1;
    for (auto& [text, id64] : entries) {
      auto id = static_cast<std::int32_t>(id64);
      std::uint64_t h = std::hash<std::string_view>{}(text);
      tokens_[id] = std::move(text);
      present_[id] = true;
      for (std::size_t i = h & mask_;; i = (i + 1) & mask_) {
        if (slots_[i].id < 0) {
          slots_[i] = {h, id};
          ++size_;
          break;
        }
        if (slots_[i].hash == h && tokens_[slots_[i].id] == tokens_[id]) {
          slots_[i].id = id;
          break;
        }
      }
    }
  }
  std::optional<std::int32_t> find(std::string_view text) const {
    if (slots_.empty())
      return std::nullopt;
    std::uint64_t h = std::hash<std::string_view>{}(text);
    for (std::size_t i = h & mask_;; i = (i + 1) & mask_) {
      const slot& sl = slots_[i];
      if (sl.id < 0)
        return std::nullopt;
      if (sl.hash == h && tokens_[sl.id] == text)
        return sl.id;
    }
  }
  std::size_t num_ids() const { return tokens_.size(); }
  bool has(std::size_t id) const { return id < present_.size() && present_[id]; }
  const std::string& text(std::size_t id) const { return tokens_[id]; }

private:
  struct slot {
    std::uint64_t hash;
    std::int32_t id;  // -1: empty
  };
  std::vector<std::string> tokens_;
  std::vector<bool> present_;
  std::vector<slot> slots_;
  std::size_t mask_ = 0, size_ = 0;
};

struct merge_info {
  std::int32_t rank;
  std::int32_t new_id;
};

// Pair (left id, right id) -> merge, open addressing with linear probing: the lookup in the
// inner loop of BPE, several times faster than std::unordered_map.
class merge_table {
public:
  void reserve(std::size_t n) {
    std::size_t cap = 16;
    while (cap < n * 2)
      cap <<= 1;
    slots_.assign(cap, slot{k_empty, {}});
    mask_ = cap - 1;
  }
  void insert(std::uint64_t key, merge_info value) {
    if ((size_ + 1) * 2 > slots_.size()) {
      auto old = std::move(slots_);
      reserve(std::max<std::size_t>(16, size_ * 2 + 2));
      size_ = 0;
      for (const auto& s : old)
        if (s.key != k_empty)
          insert(s.key, s.value);
    }
    for (std::size_t i = hash(key) & mask_;; i = (i + 1) & mask_) {
      if (slots_[i].key == k_empty) {
        slots_[i] = {key, value};
        ++size_;
        return;
      }
      if (slots_[i].key == key) {
        slots_[i].value = value;  // HF collects merges into a map: a repeated pair keeps the last rank
        return;
      }
    }
  }
  const merge_info* find(std::uint64_t key) const {
    if (slots_.empty())
      return nullptr;
    for (std::size_t i = hash(key) & mask_;; i = (i + 1) & mask_) {
      if (slots_[i].key == key)
        return &slots_[i].value;
      if (slots_[i].key == k_empty)
        return nullptr;
    }
  }

private:
  static constexpr std::uint64_t k_empty = ~std::uint64_t{0};
  static std::size_t hash(std::uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    return static_cast<std::size_t>(k);
  }
  struct slot {
    std::uint64_t key;
    merge_info value;
  };
  std::vector<slot> slots_;
  std::size_t mask_ = 0;
  std::size_t size_ = 0;
};

// Words already run through BPE (HF keeps such a cache too). Sharded so that threads encoding
// at once rarely meet on a lock; each shard stops growing when full.
class word_cache {
public:
  bool find(std::string_view word, std::vector<std::int32_t>& out) const {
    auto& sh = shards_[shard_of(word)];
    std::lock_guard<std::mutex> lock{sh.mutex};
    auto it = sh.map.find(word);
    if (it == sh.map.end())
      return false;
    out.insert(out.end(), it->second.begin(), it->second.end());
    return true;
  }
  void insert(std::string_view word, const std::int32_t* ids, std::size_t n) const {
    auto& sh = shards_[shard_of(word)];
    std::lock_guard<std::mutex> lock{sh.mutex};
    if (sh.map.size() < k_per_shard)
      sh.map.emplace(std::string{word}, std::vector<std::int32_t>(ids, ids + n));
  }
  static constexpr std::size_t k_max_word = 256;

private:
  static constexpr std::size_t k_shards = 16, k_per_shard = 4096;
  struct hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  struct shard {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<std::int32_t>, hash, std::equal_to<>> map;
  };
  static std::size_t shard_of(std::string_view w) {
    std::size_t h = 0;
    for (unsigned char c : w)
      h = h * 31 + c;
    return h % k_shards;
  }
  mutable std::array<shard, k_shards> shards_;
};

struct bpe_model {
  vocab_table vocab;
  merge_table merges;
  std::vector<std::int32_t> char_ids;  // code point -> id of the one-character token, -1 if none
  word_cache cache;
  std::optional<std::int32_t> unk_id;
  bool fuse_unk = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
  std::string continuing_subword_prefix;
  std::string end_of_word_suffix;
  std::array<std::int32_t, 256> byte_ids{};  // "<0xAB>" ids, -1 when absent
  // Byte-level vocabularies: the id of each byte's stand-in character. byte_mode when all 256
  // exist and there is no subword prefix/suffix, so BPE may start from raw bytes.
  std::array<std::int32_t, 256> byte_level_ids{};
  bool byte_mode = false;

  static std::uint64_t pair_key(std::int32_t a, std::int32_t b) {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
  }

  std::optional<std::int32_t> find(std::string_view s) const { return vocab.find(s); }

  struct symbol {
    std::int32_t id;
    int prev, next;
    std::uint32_t len;  // 0 once merged into its left neighbour
  };
  struct candidate {
    std::int32_t rank;
    int pos;
    std::int32_t new_id;
    bool operator>(const candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };

  // HF's BPE::merge_word: initial symbols (chars, byte fallback, unk), then the lowest-rank pair
  // (leftmost first) is merged until none is left.
  // `raw_bytes`: the word is raw bytes whose ByteLevel mapping is left to us (byte_mode).
  void encode_word(std::string_view word, bool raw_bytes, std::vector<std::int32_t>& out) const {
    if (ignore_merges) {
      std::string mapped;
      if (raw_bytes)
        for (unsigned char c : word)
          mapped += bytes_map().to_text[c];
      if (auto id = find(raw_bytes ? std::string_view{mapped} : word)) {
        out.push_back(*id);
        return;
      }
    }
    bool cacheable = word.size() <= word_cache::k_max_word;
    if (cacheable && cache.find(word, out))
      return;
    std::size_t first_out = out.size();
    if (raw_bytes)
      merge_bytes(word, out);
    else
      merge_word(word, out);
    if (cacheable)
      cache.insert(word, out.data() + first_out, out.size() - first_out);
  }

  // BPE from raw bytes: each byte starts as the token of its GPT-2 stand-in character.
  void merge_bytes(std::string_view word, std::vector<std::int32_t>& out) const {
    thread_local std::vector<symbol> symbols;
    symbols.clear();
    for (unsigned char c : word) {
      int idx = static_cast<int>(symbols.size());
      symbols.push_back({byte_level_ids[c], idx - 1, idx + 1, 1});
    }
    if (!symbols.empty())
      symbols.back().next = -1;
    run_merges(symbols, out);
  }

  std::optional<std::int32_t> find_char(std::string_view ch) const {
    std::size_t i = 0;
    std::int32_t cp = next_cp(ch, i);
    if (cp >= 0 && static_cast<std::size_t>(cp) < char_ids.size()) {
      std::int32_t id = char_ids[cp];
      return id >= 0 ? std::optional<std::int32_t>{id} : std::nullopt;
    }
    return find(ch);
  }

  void merge_word(std::string_view word, std::vector<std::int32_t>& out) const {
    thread_local std::vector<symbol> symbols;
    thread_local std::string piece;
    symbols.clear();
    std::optional<std::pair<std::int32_t, std::uint32_t>> pending_unk;
    auto push = [&](std::int32_t id, std::uint32_t len) {
      int idx = static_cast<int>(symbols.size());
      symbols.push_back({id, idx - 1, -1, len});
      if (idx > 0)
        symbols[idx - 1].next = idx;
    };
    auto flush_unk = [&] {
      if (pending_unk) {
        push(pending_unk->first, pending_unk->second);
        pending_unk.reset();
      }
    };
    for (std::size_t i = 0; i < word.size();) {
      std::size_t begin = i;
      next_cp(word, i);
      std::string_view ch = word.substr(begin, i - begin);
      bool first = begin == 0, last = i == word.size();
      std::optional<std::int32_t> id;
      if ((first || continuing_subword_prefix.empty()) && (!last || end_of_word_suffix.empty())) {
        id = find_char(ch);
      } else {
        piece.clear();
        if (!first)
          piece += continuing_subword_prefix;
        piece += ch;
        if (last)
          piece += end_of_word_suffix;
        id = find(piece);
      }
      auto len = static_cast<std::uint32_t>(ch.size());
      if (id) {
        flush_unk();
        push(*id, len);
        continue;
      }
      if (byte_fallback) {
        bool all = true;
        for (unsigned char b : ch)
          all = all && byte_ids[b] >= 0;
        if (all) {
          flush_unk();
          for (unsigned char b : ch)
            push(byte_ids[b], 1);
          continue;
        }
      }
      if (unk_id) {
        if (pending_unk && fuse_unk) {
          pending_unk->second += len;
        } else {
          flush_unk();
          pending_unk = std::make_pair(*unk_id, len);
        }
      }
    }
    flush_unk();
    run_merges(symbols, out);
  }

  void run_merges(std::vector<symbol>& symbols, std::vector<std::int32_t>& out) const {
    thread_local std::vector<candidate> heap;
    heap.clear();
    auto consider = [&](int left) {
      int right = symbols[left].next;
      if (right < 0)
        return;
      const merge_info* m = merges.find(pair_key(symbols[left].id, symbols[right].id));
      if (!m)
        return;
      heap.push_back({m->rank, left, m->new_id});
      std::push_heap(heap.begin(), heap.end(), std::greater<>{});
    };
    for (int i = 0; i + 1 < static_cast<int>(symbols.size()); ++i)
      consider(i);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), std::greater<>{});
      candidate top = heap.back();
      heap.pop_back();
      symbol& left = symbols[top.pos];
      if (left.len == 0 || left.next < 0)
        continue;
      symbol& right = symbols[left.next];
      const merge_info* m = merges.find(pair_key(left.id, right.id));
      if (!m || m->new_id != top.new_id)
        continue;  // stale: one side has merged since this pair was queued
      left.id = top.new_id;
      left.len += right.len;
      left.next = right.next;
      right.len = 0;
      if (left.next >= 0)
        symbols[left.next].prev = top.pos;
      if (left.prev >= 0)
        consider(left.prev);
      consider(top.pos);
    }
    for (int i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[i].next)
      out.push_back(symbols[i].id);
  }
};

// -- files --------------------------------------------------------------------------------------------

result<std::string> read_file(const fs::path& path) {
  std::ifstream in{path, std::ios::binary};
  if (!in)
    return make_error(error_code::io_error, "cannot open " + path.string());
  std::string text;
  in.seekg(0, std::ios::end);
  auto size = in.tellg();
  if (size > 0) {
    text.resize(static_cast<std::size_t>(size));
    in.seekg(0);
    in.read(text.data(), size);
  }
  if (!in)
    return make_error(error_code::io_error, "cannot read " + path.string());
  return text;
}

result<json> parse_json(const fs::path& path) {
  auto text = read_file(path);
  if (!text)
    return text.err();
  try {
    return json::parse(*text);
  } catch (const json::parse_error& e) {
    return make_error(error_code::invalid_config, path.string() + ": malformed JSON: " + e.what());
  }
}

// tokenizer.json in one pass: model.vocab and model.merges (hundreds of thousands of entries)
// go straight into flat vectors, everything else becomes a json DOM. A DOM of the vocabulary
// alone (a std::map of 150k keys) took most of the load time.
class tokenizer_json_reader {
public:
  struct merge_entry {
    std::string a, b;
    bool joined;  // "a b" form: `a` holds the whole line
  };

  json root;
  bool has_vocab = false, has_merges = false;
  std::vector<std::pair<std::string, std::int64_t>> vocab;
  std::vector<merge_entry> merges;
  std::string bad;  // the first malformed entry, "key: what"

  bool null() { return value(json(nullptr)); }
  bool boolean(bool v) { return value(json(v)); }
  bool number_integer(json::number_integer_t v) {
    if (mode_ == mode::vocab)
      return vocab_id(v);
    return value(json(v));
  }
  bool number_unsigned(json::number_unsigned_t v) {
    if (mode_ == mode::vocab)
      return vocab_id(v > static_cast<json::number_unsigned_t>(INT64_MAX) ? -1 : static_cast<std::int64_t>(v));
    return value(json(v));
  }
  bool number_float(json::number_float_t v, const std::string&) { return value(json(v)); }
  bool string(std::string& v) {
    if (mode_ == mode::merges) {
      merges.push_back({std::move(v), {}, true});
      return true;
    }
    if (mode_ == mode::merge_pair) {
      parts_.push_back(std::move(v));
      return true;
    }
    return value(json(std::move(v)));
  }
  bool binary(json::binary_t&) { return value(json(nullptr)); }
  bool key(std::string& k) {
    key_ = std::move(k);
    return true;
  }
  bool start_object(std::size_t) {
    if (mode_ == mode::dom && in_model() && key_ == "vocab") {
      has_vocab = true;
      mode_ = mode::vocab;
      return true;
    }
    return open(json::object());
  }
  bool end_object() {
    if (mode_ == mode::vocab) {
      mode_ = mode::dom;
      return true;
    }
    return close();
  }
  bool start_array(std::size_t) {
    if (mode_ == mode::dom && in_model() && key_ == "merges") {
      has_merges = true;
      mode_ = mode::merges;
      return true;
    }
    if (mode_ == mode::merges) {
      mode_ = mode::merge_pair;
      parts_.clear();
      return true;
    }
    return open(json::array());
  }
  bool end_array() {
    if (mode_ == mode::merges) {
      mode_ = mode::dom;
      return true;
    }
    if (mode_ == mode::merge_pair) {
      mode_ = mode::merges;
      if (parts_.size() != 2)
        return fail("model.merges[" + std::to_string(merges.size()) + "]: expected \"a b\" or [\"a\", \"b\"]");
      merges.push_back({std::move(parts_[0]), std::move(parts_[1]), false});
      return true;
    }
    return close();
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) {
    return fail(std::string{"malformed JSON: "} + e.what());
  }

private:
  enum class mode { dom, vocab, merges, merge_pair };

  bool in_model() const { return stack_.size() == 2 && keys_[1] == "model" && stack_[1]->is_object(); }

  bool fail(std::string what) {
    if (bad.empty())
      bad = std::move(what);
    return false;
  }
  bool vocab_id(std::int64_t v) {
    if (v < 0 || v > INT32_MAX)
      return fail("model.vocab[\"" + key_ + "\"]: expected a non-negative id");
    vocab.emplace_back(std::move(key_), v);
    return true;
  }
  json* insert(json&& v) {
    if (mode_ == mode::vocab) {
      fail("model.vocab[\"" + key_ + "\"]: expected a non-negative id");
      return nullptr;
    }
    if (mode_ != mode::dom) {
      fail("model.merges[" + std::to_string(merges.size()) + "]: expected \"a b\" or [\"a\", \"b\"]");
      return nullptr;
    }
    if (stack_.empty()) {
      root = std::move(v);
      return &root;
    }
    json* parent = stack_.back();
    if (parent->is_object())
      return &((*parent)[key_] = std::move(v));
    parent->push_back(std::move(v));
    return &parent->back();
  }
  bool value(json&& v) { return insert(std::move(v)) != nullptr; }
  bool open(json&& v) {
    std::string k = stack_.empty() || !stack_.back()->is_object() ? std::string{} : key_;
    json* at = insert(std::move(v));
    if (!at)
      return false;
    stack_.push_back(at);
    keys_.push_back(std::move(k));
    return true;
  }
  bool close() {
    stack_.pop_back();
    keys_.pop_back();
    return true;
  }

  mode mode_ = mode::dom;
  std::vector<json*> stack_;
  std::vector<std::string> keys_;
  std::string key_;
  std::vector<std::string> parts_;
};

// bos_token / eos_token / … in tokenizer_config.json: a string or an AddedToken object.
std::optional<std::string> config_token(const json& config, const char* key) {
  auto it = config.find(key);
  if (it == config.end())
    return std::nullopt;
  if (it->is_string())
    return it->get<std::string>();
  if (it->is_object())
    if (auto c = it->find("content"); c != it->end() && c->is_string())
      return c->get<std::string>();
  return std::nullopt;
}

}  // namespace

// -- the tokenizer ----------------------------------------------------------------------------------

struct tokenizer::impl {
  std::vector<normalizer_step> normalizer;
  std::vector<pre_step> pre_tokenizer;
  bpe_model model;
  std::vector<decoder_step> decoder;
  bool has_decoder = false;
  // What the decoder chain lets a stream emit before the end (decode_stream).
  enum class stream_kind { byte_level, pieces, hold_all } stream = stream_kind::pieces;
  bool has_byte_fallback = false;

  std::vector<added_token> added;  // stable addresses: the matchers point into it
  added_matcher raw_matcher;       // added tokens with normalized=false, matched on the input
  added_matcher norm_matcher;      // normalized=true, matched after normalization

  std::vector<const std::string*> id_token;  // id -> token text (into model.vocab or added)
  std::vector<std::uint8_t> id_flags; // bit 0: exists, bit 1: special
  std::vector<std::string> id_bytes;  // byte-level decoders only: id -> bytes
  std::size_t num_ids = 0;

  std::vector<std::int32_t> prefix_ids, suffix_ids;  // added by add_special_tokens
  bool clean_up_spaces = false;  // tokenizer_config.json clean_up_tokenization_spaces

  std::optional<std::int32_t> bos, eos;
  std::string bos_text, eos_text;
  json chat_vars = json::object();
  std::optional<chat_template> chat;

  // -- encode --

  // Pieces are views into the input or into `arena` (text a step rewrote). When ByteLevel is the
  // last step its mapping is left to the model, which starts BPE from the raw bytes.
  void pre_tokenize(std::string_view text, bool at_start, std::vector<std::int32_t>& out) const {
    thread_local std::vector<std::string_view> pieces, next, parts;
    thread_local std::deque<std::string> arena;
    thread_local offsets hits;
    arena.clear();
    pieces.assign(1, text);
    for (std::size_t step_idx = 0; step_idx < pre_tokenizer.size(); ++step_idx) {
      const auto& step = pre_tokenizer[step_idx];
      next.clear();
      using k = pre_step::kind;
      switch (step.k) {
        case k::split:
          for (auto p : pieces) {
            if (step.regex)
              step.regex->find_all(p, hits);
            else
              find_literal(p, step.literal, hits);
            split_by(p, hits, step.behavior, step.invert, next);
          }
          break;
        case k::byte_level: {
          const auto& map = bytes_map();
          bool map_here = !(step_idx + 1 == pre_tokenizer.size() && model.byte_mode);
          for (auto p : pieces) {
            std::string_view src = p;
            if (step.add_prefix_space && (src.empty() || src[0] != ' ')) {
              arena.push_back(" ");
              arena.back() += src;
              src = arena.back();
            }
            parts.clear();
            if (step.regex) {
              step.regex->find_all(src, hits);
              split_by(src, hits, split_behavior::isolated, false, parts);
            } else if (!src.empty()) {
              parts.push_back(src);
            }
            for (auto part : parts) {
              if (!map_here) {
                next.push_back(part);
                continue;
              }
              std::string& mapped = arena.emplace_back();
              mapped.reserve(part.size() * 2);
              for (unsigned char c : part)
                mapped += map.to_text[c];
              next.push_back(mapped);
            }
          }
          break;
        }
        case k::metaspace:
          for (auto p : pieces) {
            std::string& s = arena.emplace_back(p);
            replace_all(s, " ", step.replacement);
            // "first": only the piece that starts the input (HF: offsets_original().0 == 0)
            bool prepend = step.scheme == pre_step::prepend_scheme::always ||
                           (step.scheme == pre_step::prepend_scheme::first && at_start && p.data() == text.data());
            if (prepend && s.compare(0, step.replacement.size(), step.replacement) != 0)
              s.insert(0, step.replacement);
            if (step.split) {
              find_literal(s, step.replacement, hits);
              split_by(s, hits, split_behavior::merged_with_next, false, next);
            } else if (!s.empty()) {
              next.push_back(s);
            }
          }
          break;
        case k::digits:
          for (auto p : pieces) {
            hits.clear();
            for (std::size_t i = 0; i < p.size();) {
              std::size_t b = i;
              if (is_numeric_cp(next_cp(p, i)))
                hits.emplace_back(b, i);
            }
            split_by(p, hits, step.individual_digits ? split_behavior::isolated : split_behavior::contiguous,
                     false, next);
          }
          break;
      }
      std::swap(pieces, next);
    }
    bool raw_bytes = model.byte_mode && !pre_tokenizer.empty() && pre_tokenizer.back().k == pre_step::kind::byte_level;
    for (auto p : pieces)
      model.encode_word(p, raw_bytes, out);
  }

  void encode_text(std::string_view text, std::vector<std::int32_t>& out) const {
    std::vector<added_matcher::segment> raw, norm;
    raw_matcher.split(text, raw);
    for (const auto& seg : raw) {
      if (seg.token) {
        out.push_back(seg.token->id);
        continue;
      }
      if (seg.end == seg.begin)
        continue;
      std::string n{text.substr(seg.begin, seg.end - seg.begin)};
      for (const auto& step : normalizer)
        apply_normalizer(step, n);
      norm_matcher.split(n, norm);
      for (const auto& part : norm) {
        if (part.token)
          out.push_back(part.token->id);
        else if (part.end > part.begin)
          pre_tokenize(std::string_view{n}.substr(part.begin, part.end - part.begin),
                       seg.begin == 0 && part.begin == 0, out);
      }
    }
  }

  // -- decode --

  bool exists(std::int32_t id) const {
    return id >= 0 && static_cast<std::size_t>(id) < num_ids && (id_flags[id] & 1);
  }
  bool kept(std::int32_t id, bool skip_special) const {
    return exists(id) && !(skip_special && (id_flags[id] & 2));
  }

  std::string run_pipeline(std::vector<std::string> tokens) const {
    if (!has_decoder) {
      std::string out;
      for (std::size_t i = 0; i < tokens.size(); ++i) {
        if (i)
          out += ' ';
        out += tokens[i];
      }
      return out;
    }
    for (const auto& step : decoder)
      run_decoder(step, tokens);
    std::string out;
    for (const auto& t : tokens)
      out += t;
    return out;
  }

  // The full decode, and in *stable how many of its leading bytes no later id can change.
  std::string decode(std::span<const std::int32_t> ids, bool skip_special, std::size_t* stable) const {
    std::size_t raw_stable = 0;
    std::string text = decode_raw(ids, skip_special, stable ? &raw_stable : nullptr);
    if (!clean_up_spaces) {
      if (stable)
        *stable = raw_stable;
      return text;
    }
    std::string clean = clean_up_tokenization(text);
    if (stable) {
      // Each replacement looks at most a few bytes ahead and scans left to right, so the cleaned
      // text of a prefix that ends 8 bytes before the stable point, less its own last 8 bytes,
      // is final.
      std::size_t cut = raw_stable >= 8 ? raw_stable - 8 : 0;
      while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80)
        --cut;
      std::string head = clean_up_tokenization(text.substr(0, cut));
      std::size_t keep = head.size() >= 8 ? head.size() - 8 : 0;
      while (keep > 0 && (static_cast<unsigned char>(head[keep]) & 0xC0) == 0x80)
        --keep;
      *stable = clean.compare(0, keep, head, 0, keep) == 0 ? keep : 0;
    }
    return clean;
  }

  // transformers' PreTrainedTokenizerBase.clean_up_tokenization, when the config asks for it.
  static std::string clean_up_tokenization(std::string s) {
    for (auto [from, to] : {std::pair{" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"},
                            {" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}})
      replace_all(s, from, to);
    return s;
  }

  std::string decode_raw(std::span<const std::int32_t> ids, bool skip_special, std::size_t* stable) const {
    if (stream == stream_kind::byte_level) {
      std::string bytes;
      for (auto id : ids)
        if (kept(id, skip_special))
          bytes += id_bytes[id];
      std::string text;
      std::size_t s = append_lossy(text, bytes);
      if (stable)
        *stable = s;
      return text;
    }
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (auto id : ids)
      if (kept(id, skip_special))
        tokens.push_back(*id_token[id]);
    std::size_t run_start = tokens.size();
    if (stable && has_byte_fallback)
      while (run_start > 0 && byte_token_value(tokens[run_start - 1]) >= 0)
        --run_start;
    std::string text = run_pipeline(tokens);
    if (stable) {
      if (stream == stream_kind::hold_all)
        *stable = 0;
      else if (run_start == tokens.size())
        *stable = text.size();
      else  // a byte run may still grow and turn invalid: hold it back whole
        *stable = run_pipeline(std::vector<std::string>(tokens.begin(), tokens.begin() + run_start)).size();
    }
    return text;
  }
};

result<std::shared_ptr<const tokenizer>> tokenizer::load(const std::string& dir) {
  try {
    auto state = std::make_unique<impl>();
    fs::path root{dir};
    fs::path tok_path = root / "tokenizer.json";
    const std::string tj = tok_path.string();
    if (!fs::is_regular_file(tok_path))
      return make_error(error_code::io_error, "no tokenizer.json in " + dir);
    auto tok_text = read_file(tok_path);
    if (!tok_text)
      return tok_text.err();
    tokenizer_json_reader reader;
    if (!json::sax_parse(*tok_text, &reader) || !reader.bad.empty())
      return config_error(tj, reader.bad.empty() ? "malformed JSON" : reader.bad);
    tok_text->clear();
    tok_text->shrink_to_fit();
    const json& j = reader.root;
    if (!j.is_object())
      return config_error(tj, "expected a JSON object");

    MOERT_TRY(parse_normalizer(j.value("normalizer", json{}), tj + ": normalizer", state->normalizer));
    MOERT_TRY(parse_pre_tokenizer(j.value("pre_tokenizer", json{}), tj + ": pre_tokenizer", state->pre_tokenizer));
    if (auto it = j.find("decoder"); it != j.end() && !it->is_null()) {
      state->has_decoder = true;
      MOERT_TRY(parse_decoder(*it, tj + ": decoder", state->decoder));
    }

    // model
    auto mit = j.find("model");
    if (mit == j.end() || !mit->is_object())
      return config_error(tj + ": model", "expected an object");
    const json& m = *mit;
    std::string model_type = m.value("type", std::string{"BPE"});
    if (model_type != "BPE")
      return unsupported_error(tj + ": model.type", "model '" + model_type + "' is not supported (only BPE)");
    if (auto d = m.find("dropout"); d != m.end() && !d->is_null() && !(d->is_number() && d->get<double>() == 0.0))
      return unsupported_error(tj + ": model.dropout", "BPE dropout is not supported");
    auto& model = state->model;
    if (!reader.has_vocab)
      return config_error(tj + ": model.vocab", "expected an object of token -> id");
    model.vocab.build(std::move(reader.vocab));
    reader.vocab = {};
    auto max_id = static_cast<std::int32_t>(model.vocab.num_ids()) - 1;
    auto str_or_null = [&](const char* key) {
      auto it = m.find(key);
      return it != m.end() && it->is_string() ? it->get<std::string>() : std::string{};
    };
    model.continuing_subword_prefix = str_or_null("continuing_subword_prefix");
    model.end_of_word_suffix = str_or_null("end_of_word_suffix");
    model.fuse_unk = get_bool(m, "fuse_unk", false);
    model.byte_fallback = get_bool(m, "byte_fallback", false);
    model.ignore_merges = get_bool(m, "ignore_merges", false);
    if (auto unk = str_or_null("unk_token"); !unk.empty()) {
      auto id = model.find(unk);
      if (!id)
        return config_error(tj + ": model.unk_token", "'" + unk + "' is not in model.vocab");
      model.unk_id = *id;
    }
    model.byte_ids.fill(-1);
    if (model.byte_fallback)
      for (int b = 0; b < 256; ++b) {
        char name[8];
        std::snprintf(name, sizeof name, "<0x%02X>", b);
        if (auto id = model.find(name))
          model.byte_ids[b] = *id;
      }

    // One-character tokens by code point, for the first step of BPE.
    model.char_ids.assign(0x3100, -1);
    for (std::size_t id = 0; id < model.vocab.num_ids(); ++id) {
      const std::string& text = model.vocab.text(id);
      if (!model.vocab.has(id) || text.empty() || text.size() > 4)
        continue;
      std::size_t i = 0;
      std::int32_t cp = next_cp(text, i);
      if (i == text.size() && cp >= 0 && static_cast<std::size_t>(cp) < model.char_ids.size() &&
          model.find(text) == static_cast<std::int32_t>(id))
        model.char_ids[cp] = static_cast<std::int32_t>(id);
    }

    model.byte_mode = model.continuing_subword_prefix.empty() && model.end_of_word_suffix.empty();
    for (int b = 0; b < 256; ++b) {
      auto id = model.find(bytes_map().to_text[b]);
      model.byte_level_ids[b] = id ? *id : -1;
      model.byte_mode = model.byte_mode && id.has_value();
    }

    if (!reader.has_merges)
      return config_error(tj + ": model.merges", "expected an array");
    model.merges.reserve(reader.merges.size());
    std::size_t prefix_len = model.continuing_subword_prefix.size();
    std::string joined;
    for (std::size_t rank = 0; rank < reader.merges.size(); ++rank) {
      const auto& e = reader.merges[rank];
      std::string_view a, b;
      if (e.joined) {
        const auto& s = e.a;
        auto sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          return config_error(tj + ": model.merges[" + std::to_string(rank) + "]",
                              "expected \"a b\", got \"" + s + "\"");
        a = std::string_view{s}.substr(0, sp);
        b = std::string_view{s}.substr(sp + 1);
      } else {
        a = e.a;
        b = e.b;
      }
      auto ia = model.find(a), ib = model.find(b);
      if (!ia || !ib)
        return config_error(tj + ": model.merges[" + std::to_string(rank) + "]",
                            "'" + std::string{!ia ? a : b} + "' is not in model.vocab");
      // HF: the merged token is a + b without b's continuing-subword prefix.
      std::string_view b_tail = b;
      if (prefix_len > 0 && b_tail.substr(0, prefix_len) == model.continuing_subword_prefix)
        b_tail.remove_prefix(prefix_len);
      joined.assign(a);
      joined.append(b_tail);
      auto inew = model.find(joined);
      if (!inew)
        return config_error(tj + ": model.merges[" + std::to_string(rank) + "]",
                            "the merged token '" + joined + "' is not in model.vocab");
      model.merges.insert(bpe_model::pair_key(*ia, *ib), merge_info{static_cast<std::int32_t>(rank), *inew});
    }

    // added tokens
    if (auto at = j.find("added_tokens"); at != j.end() && !at->is_null()) {
      if (!at->is_array())
        return config_error(tj + ": added_tokens", "expected an array");
      state->added.reserve(at->size());
      for (std::size_t i = 0; i < at->size(); ++i) {
        const json& t = (*at)[i];
        std::string where = tj + ": added_tokens[" + std::to_string(i) + "]";
        if (!t.is_object())
          return config_error(where, "expected an object");
        auto content = get_string(t, "content", where);
        if (!content)
          return content.err();
        auto id = t.find("id");
        if (id == t.end() || !id->is_number_integer() || id->get<std::int64_t>() < 0 ||
            id->get<std::int64_t>() > INT32_MAX)
          return config_error(where + ".id", "expected a non-negative id");
        added_token tok;
        tok.content = *content;
        tok.id = id->get<std::int32_t>();
        tok.special = get_bool(t, "special", false);
        tok.lstrip = get_bool(t, "lstrip", false);
        tok.rstrip = get_bool(t, "rstrip", false);
        tok.normalized = get_bool(t, "normalized", !tok.special);
        tok.single_word = get_bool(t, "single_word", false);
        max_id = std::max(max_id, tok.id);
        state->added.push_back(std::move(tok));
      }
      for (const auto& tok : state->added)
        (tok.normalized ? state->norm_matcher : state->raw_matcher).add(tok);
    }

    // id tables
    state->num_ids = static_cast<std::size_t>(max_id + 1);
    static const std::string k_none;
    state->id_token.assign(state->num_ids, &k_none);
    state->id_flags.assign(state->num_ids, 0);
    for (std::size_t id = 0; id < model.vocab.num_ids(); ++id)
      if (model.vocab.has(id)) {
        state->id_token[id] = &model.vocab.text(id);
        state->id_flags[id] = 1;
      }
    for (const auto& tok : state->added) {
      state->id_token[tok.id] = &tok.content;
      state->id_flags[tok.id] = static_cast<std::uint8_t>(1 | (tok.special ? 2 : 0));
    }

    // How a stream may emit text early (see decode_stream).
    using dk = decoder_step::kind;
    if (state->decoder.size() == 1 && state->decoder[0].k == dk::byte_level) {
      state->stream = impl::stream_kind::byte_level;
      state->id_bytes.resize(state->num_ids);
      for (std::size_t id = 0; id < state->num_ids; ++id)
        if (state->id_flags[id] & 1)
          state->id_bytes[id] = byte_level_bytes(*state->id_token[id]);
    } else {
      bool fused = false;
      for (const auto& step : state->decoder) {
        if (step.k == dk::byte_fallback)
          state->has_byte_fallback = true;
        if (step.k == dk::fuse)
          fused = true;
        // A byte-level step in a chain, or stripping the end of fused text, can change text
        // already produced when more ids arrive.
        if (step.k == dk::byte_level || (step.k == dk::strip && step.stop > 0 && fused))
          state->stream = impl::stream_kind::hold_all;
      }
    }

    // post-processor
    auto template_ids = [&](const json& pp, const std::string& where) -> status {
      auto single = pp.find("single");
      if (single == pp.end() || !single->is_array())
        return config_error(where + ".single", "expected an array");
      auto specials = pp.value("special_tokens", json::object());
      bool seen_sequence = false;
      for (const auto& piece : *single) {
        if (piece.contains("Sequence")) {
          seen_sequence = true;
          continue;
        }
        auto st = piece.find("SpecialToken");
        if (st == piece.end() || !st->is_object())
          return config_error(where + ".single", "expected SpecialToken or Sequence items");
        auto name = get_string(*st, "id", where + ".single[].SpecialToken");
        if (!name)
          return name.err();
        auto sp = specials.find(*name);
        if (sp == specials.end() || !sp->contains("ids") || !(*sp)["ids"].is_array())
          return config_error(where + ".special_tokens", "no ids for '" + *name + "'");
        for (const auto& id : (*sp)["ids"])
          (seen_sequence ? state->suffix_ids : state->prefix_ids).push_back(id.get<std::int32_t>());
      }
      return status::success();
    };
    std::function<status(const json&, const std::string&)> parse_post = [&](const json& pp,
                                                                              const std::string& where) -> status {
      if (pp.is_null())
        return status::success();
      auto type = get_string(pp, "type", where);
      if (!type)
        return type.err();
      if (*type == "ByteLevel")
        return status::success();  // offsets only
      if (*type == "TemplateProcessing")
        return template_ids(pp, where);
      if (*type == "Sequence") {
        auto procs = pp.find("processors");
        if (procs == pp.end() || !procs->is_array())
          return config_error(where + ".processors", "expected an array");
        for (std::size_t i = 0; i < procs->size(); ++i)
          MOERT_TRY(parse_post((*procs)[i], where + ".processors[" + std::to_string(i) + "]"));
        return status::success();
      }
      if (*type == "RobertaProcessing" || *type == "BertProcessing") {
        auto cls = pp.find("cls"), sep = pp.find("sep");
        if (cls == pp.end() || sep == pp.end() || !cls->is_array() || !sep->is_array() || cls->size() != 2 ||
            sep->size() != 2)
          return config_error(where, "expected cls and sep as [token, id]");
        state->prefix_ids.push_back((*cls)[1].get<std::int32_t>());
        state->suffix_ids.push_back((*sep)[1].get<std::int32_t>());
        return status::success();
      }
      return unsupported_error(where + ".type", "post-processor '" + *type + "' is not supported");
    };
    MOERT_TRY(parse_post(j.value("post_processor", json{}), tj + ": post_processor"));

    // tokenizer_config.json (optional)
    json config = json::object();
    fs::path cfg_path = root / "tokenizer_config.json";
    const std::string cj = cfg_path.string();
    if (fs::exists(cfg_path)) {
      auto c = parse_json(cfg_path);
      if (!c)
        return c.err();
      if (!c->is_object())
        return config_error(cj, "expected a JSON object");
      config = std::move(*c);
    }
    auto token_id = [&](const std::string& text) -> std::optional<std::int32_t> {
      for (const auto& tok : state->added)
        if (tok.content == text)
          return tok.id;
      return state->model.find(text);
    };
    for (const char* key : {"bos_token", "eos_token", "unk_token", "pad_token"})
      if (auto t = config_token(config, key))
        state->chat_vars[key] = *t;
    if (auto it = config.find("additional_special_tokens"); it != config.end() && it->is_array()) {
      json list = json::array();
      for (const auto& t : *it) {
        if (t.is_string())
          list.push_back(t);
        else if (t.is_object() && t.contains("content"))
          list.push_back(t["content"]);
      }
      state->chat_vars["additional_special_tokens"] = std::move(list);
    }
    state->chat_vars["tools"] = nullptr;
    state->chat_vars["documents"] = nullptr;
    if (auto t = config_token(config, "bos_token")) {
      state->bos_text = *t;
      state->bos = token_id(*t);
      if (!state->bos)
        return config_error(cj + ": bos_token", "'" + *t + "' is not a token of tokenizer.json");
    }
    if (auto t = config_token(config, "eos_token")) {
      state->eos_text = *t;
      state->eos = token_id(*t);
      if (!state->eos)
        return config_error(cj + ": eos_token", "'" + *t + "' is not a token of tokenizer.json");
    }
    // Absent means false, transformers' default since 4.45.
    state->clean_up_spaces = get_bool(config, "clean_up_tokenization_spaces", false);
    // transformers rebuilds the post-processor of these fast tokenizers from add_bos_token /
    // add_eos_token (LlamaTokenizerFast.update_post_processor), whatever tokenizer.json says.
    std::string cls = config.value("tokenizer_class", std::string{});
    if (cls == "LlamaTokenizer" || cls == "LlamaTokenizerFast" || cls == "CodeLlamaTokenizer" ||
        cls == "CodeLlamaTokenizerFast" || cls == "GemmaTokenizer" || cls == "GemmaTokenizerFast") {
      state->prefix_ids.clear();
      state->suffix_ids.clear();
      if (get_bool(config, "add_bos_token", true)) {
        if (!state->bos)
          return config_error(cj + ": add_bos_token", "true, but there is no bos_token");
        state->prefix_ids.push_back(*state->bos);
      }
      if (get_bool(config, "add_eos_token", false)) {
        if (!state->eos)
          return config_error(cj + ": add_eos_token", "true, but there is no eos_token");
        state->suffix_ids.push_back(*state->eos);
      }
    }
    for (auto id : state->prefix_ids)
      if (!state->exists(id))
        return config_error(tj + ": post_processor", "special token id " + std::to_string(id) + " is not in the vocabulary");
    for (auto id : state->suffix_ids)
      if (!state->exists(id))
        return config_error(tj + ": post_processor", "special token id " + std::to_string(id) + " is not in the vocabulary");

    // chat template: tokenizer_config.json, else chat_template.jinja, else ChatML
    std::optional<std::string> source;
    std::string source_name;
    if (auto it = config.find("chat_template"); it != config.end() && !it->is_null()) {
      source_name = cj + ": chat_template";
      if (it->is_string()) {
        source = it->get<std::string>();
      } else if (it->is_array()) {
        for (const auto& named : *it)
          if (named.is_object() && named.value("name", std::string{}) == "default" && named.contains("template") &&
              named["template"].is_string())
            source = named["template"].get<std::string>();
        if (!source)
          return config_error(source_name, "a list of templates without one named 'default'");
      } else {
        return config_error(source_name, "expected a string or a list of {name, template}");
      }
    } else if (fs::path jinja = root / "chat_template.jinja"; fs::is_regular_file(jinja)) {
      auto text = read_file(jinja);
      if (!text)
        return text.err();
      source = std::move(*text);
      source_name = jinja.string();
    }
    if (source) {
      auto parsed = chat_template::parse(*source);
      if (!parsed)
        return make_error(parsed.err().code, source_name + ": " + parsed.err().message);
      state->chat = std::move(*parsed);
    } else {
      state->chat = chat_template::chatml();
    }

    return std::shared_ptr<const tokenizer>{std::make_shared<tokenizer>(std::move(state))};
  } catch (const json::exception& e) {
    return make_error(error_code::invalid_config, dir + ": tokenizer files of an unexpected shape: " + e.what());
  } catch (const std::bad_alloc&) {
    return make_error(error_code::io_error, dir + ": out of memory while loading the tokenizer");
  }
}

tokenizer::tokenizer(std::unique_ptr<impl> state) : impl_{std::move(state)} {}
tokenizer::~tokenizer() = default;

std::vector<std::int32_t> tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<std::int32_t> out;
  if (add_special_tokens)
    out = impl_->prefix_ids;
  if (is_valid_utf8(text)) {
    impl_->encode_text(text, out);
  } else {
    std::string clean;  // a Python/Rust string cannot hold invalid UTF-8; replace it first
    append_lossy(clean, text);
    impl_->encode_text(clean, out);
  }
  if (add_special_tokens)
    out.insert(out.end(), impl_->suffix_ids.begin(), impl_->suffix_ids.end());
  return out;
}

std::string tokenizer::decode(std::span<const std::int32_t> ids, bool skip_special_tokens) const {
  return impl_->decode(ids, skip_special_tokens, nullptr);
}

std::size_t tokenizer::vocab_size() const {
  return impl_->num_ids;
}

std::optional<std::int32_t> tokenizer::token_to_id(std::string_view token) const {
  for (const auto& tok : impl_->added)
    if (tok.content == token)
      return tok.id;
  return impl_->model.find(token);
}

std::optional<std::string> tokenizer::id_to_token(std::int32_t id) const {
  if (!impl_->exists(id))
    return std::nullopt;
  return *impl_->id_token[id];
}

bool tokenizer::is_special(std::int32_t id) const {
  return impl_->exists(id) && (impl_->id_flags[id] & 2);
}

std::optional<std::int32_t> tokenizer::bos_id() const {
  return impl_->bos;
}
std::optional<std::int32_t> tokenizer::eos_id() const {
  return impl_->eos;
}
std::string tokenizer::bos_token() const {
  return impl_->bos_text;
}
std::string tokenizer::eos_token() const {
  return impl_->eos_text;
}
const chat_template& tokenizer::chat() const {
  return *impl_->chat;
}
const nlohmann::json& tokenizer::chat_variables() const {
  return impl_->chat_vars;
}
result<std::string> tokenizer::apply_chat_template(const nlohmann::json& messages,
                                                   bool add_generation_prompt) const {
  return impl_->chat->render(messages, add_generation_prompt, impl_->chat_vars);
}

// -- decode_stream ---------------------------------------------------------------------------------
//
// Each push decodes the ids kept so far and returns the part of the text that is new and can no
// longer change. The ids are cut back to the last one whenever everything is emitted and that
// id decodes alone to exactly the tail of the text, so a push costs O(window), not O(stream).

decode_stream::decode_stream(std::shared_ptr<const tokenizer> tok, bool skip_special_tokens)
    : tok_{std::move(tok)}, skip_special_{skip_special_tokens} {}

std::string decode_stream::push(std::int32_t id) {
  ids_.push_back(id);
  std::size_t stable = 0;
  std::string text = tok_->impl_->decode(ids_, skip_special_, &stable);
  std::string out;
  if (stable > emitted_bytes_) {
    out = text.substr(emitted_bytes_, stable - emitted_bytes_);
    emitted_bytes_ = stable;
  }
  if (ids_.size() >= 8 && emitted_bytes_ == text.size()) {
    std::size_t last_stable = 0;
    std::int32_t last = ids_.back();
    std::string alone = tok_->impl_->decode(std::span<const std::int32_t>{&last, 1}, skip_special_, &last_stable);
    if (!alone.empty() && last_stable == alone.size() && alone.find(k_replacement) == std::string::npos &&
        text.size() >= alone.size() && text.compare(text.size() - alone.size(), alone.size(), alone) == 0) {
      ids_.assign(1, last);
      emitted_bytes_ = alone.size();
    }
  }
  return out;
}

std::string decode_stream::flush() {
  std::string text = tok_->impl_->decode(ids_, skip_special_, nullptr);
  std::string out = emitted_bytes_ < text.size() ? text.substr(emitted_bytes_) : std::string{};
  ids_.clear();
  emitted_bytes_ = 0;
  return out;
}

}  // namespace moert::tokenizer
