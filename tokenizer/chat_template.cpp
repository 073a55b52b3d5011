// The chat-template interpreter: lexer → parser → AST → tree-walking evaluator, following
// jinja2 3.1 as transformers configures it (trim_blocks, lstrip_blocks, loopcontrols, an
// immutable sandbox, its own tojson, raise_exception and strftime_now).
//
// Templates come from checkpoints, so they are untrusted input: every failure becomes an
// error value (exceptions are used inside this file only and never leave render/parse), and
// parse depth, evaluation depth, steps, output size and value sizes are all bounded.

#include "tokenizer/chat_template.hpp"

#include <utf8proc.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <limits>
#include <new>
#include <optional>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace moert::tokenizer {

namespace {

// -- limits ---------------------------------------------------------------------------------

constexpr int max_parse_nesting = 96;  // brackets, unary chains, nested blocks
constexpr int max_ast_depth = 256;     // operator chains (left-deep trees) included
constexpr int max_eval_depth = 600;    // evaluator recursion, macro calls included
constexpr int max_macro_depth = 48;
constexpr std::uint64_t max_steps = 20'000'000;  // expression/statement evaluations per render
constexpr std::size_t max_bytes = 64u << 20;     // output and any single string
constexpr std::size_t max_items = 1u << 20;      // any single list
constexpr std::uint32_t max_value_depth = 256;   // nesting of lists/dicts/bound values

// Thrown inside this file only; parse() and render() turn it into an error value.
struct template_failure {
  std::string message;
  bool raised = false;  // from raise_exception: the message is the template's own text
};

[[noreturn]] void fail_plain(std::string message) {
  throw template_failure{std::move(message), false};
}

// The running render's step counter. Building a list or a string costs steps in proportion to
// its size, so the step limit also bounds the memory a template can churn through.
thread_local std::uint64_t* current_steps = nullptr;

void charge(std::uint64_t steps) {
  if (!current_steps)
    return;
  *current_steps += steps;
  if (*current_steps > max_steps)
    fail_plain("the template ran more than " + std::to_string(max_steps) + " steps");
}

// -- UTF-8 ------------------------------------------------------------------------------------

// Invalid bytes decode to U+DC80..U+DCFF and encode back to the same byte, so strings that
// are not valid UTF-8 survive slicing unchanged.
std::u32string decode_utf8(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  std::size_t i = 0;
  while (i < s.size()) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      out.push_back(c);
      ++i;
      continue;
    }
    int len = c >= 0xF0 && c < 0xF5 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 && c < 0xE0 ? 2 : 0;
    if (c >= 0xF5)
      len = 0;
    char32_t cp = 0;
    bool ok = len > 0 && i + len <= s.size();
    if (ok) {
      cp = c & (0x7F >> len);
      for (int k = 1; k < len; ++k) {
        unsigned char cc = static_cast<unsigned char>(s[i + k]);
        if ((cc & 0xC0) != 0x80) {
          ok = false;
          break;
        }
        cp = (cp << 6) | (cc & 0x3F);
      }
      if (ok && ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
                 (cp >= 0xD800 && cp <= 0xDFFF)))
        ok = false;
    }
    if (ok) {
      out.push_back(cp);
      i += len;
    } else {
      out.push_back(0xDC00 + c);
      ++i;
    }
  }
  return out;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp >= 0xDC80 && cp <= 0xDCFF) {
    out.push_back(static_cast<char>(cp - 0xDC00));
  } else if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string encode_utf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s)
    append_utf8(out, c);
  return out;
}

bool is_ascii(std::string_view s) {
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80)
      return false;
  return true;
}

std::size_t utf8_length(std::string_view s) {
  if (is_ascii(s))
    return s.size();
  return decode_utf8(s).size();
}

// Python's str.isspace().
bool py_space(char32_t c) {
  return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F) || c == 0x85 ||
         c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

char32_t to_upper_cp(char32_t c) {
  if (c < 0x80)
    return (c >= 'a' && c <= 'z') ? c - 32 : c;
  if (c >= 0xDC80 && c <= 0xDCFF)
    return c;
  return static_cast<char32_t>(utf8proc_toupper(static_cast<utf8proc_int32_t>(c)));
}
char32_t to_lower_cp(char32_t c) {
  if (c < 0x80)
    return (c >= 'A' && c <= 'Z') ? c + 32 : c;
  if (c >= 0xDC80 && c <= 0xDCFF)
    return c;
  return static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c)));
}
bool is_alpha_cp(char32_t c) {
  if (c < 0x80)
    return (c | 32) >= 'a' && (c | 32) <= 'z';
  if (c >= 0xDC80 && c <= 0xDCFF)
    return false;
  auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
  return cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO;
}
bool is_digit_cp(char32_t c) {
  return c >= '0' && c <= '9';
}

std::string map_case(std::string_view s, bool upper) {
  if (is_ascii(s)) {
    std::string out(s);
    for (char& c : out)
      c = static_cast<char>(upper ? to_upper_cp(c) : to_lower_cp(c));
    return out;
  }
  std::string out;
  for (char32_t c : decode_utf8(s)) {
    if (upper && c == 0xDF) {
      out += "SS";  // Python's full case mapping; the simple one would give U+1E9E
      continue;
    }
    append_utf8(out, upper ? to_upper_cp(c) : to_lower_cp(c));
  }
  return out;
}

// -- numbers as Python prints them ----------------------------------------------------------

// float.__repr__: the shortest round-trip digits, fixed notation for 1e-4 <= |x| < 1e16.
std::string py_float_repr(double d) {
  if (std::isnan(d))
    return "nan";
  if (std::isinf(d))
    return d > 0 ? "inf" : "-inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string s(buf, res.ptr);
  std::string out;
  if (s[0] == '-') {
    out = "-";
    s.erase(0, 1);
  }
  std::size_t epos = s.find('e');
  int exp = std::atoi(s.c_str() + epos + 1);
  std::string digits;
  for (std::size_t i = 0; i < epos; ++i)
    if (s[i] != '.')
      digits.push_back(s[i]);
  int decpt = exp + 1;
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) {
      out += "0." + std::string(static_cast<std::size_t>(-decpt), '0') + digits;
    } else if (static_cast<std::size_t>(decpt) >= digits.size()) {
      out += digits + std::string(decpt - digits.size(), '0') + ".0";
    } else {
      out += digits.substr(0, decpt) + "." + digits.substr(decpt);
    }
  } else {
    out += digits.substr(0, 1);
    if (digits.size() > 1)
      out += "." + digits.substr(1);
    char e[16];
    std::snprintf(e, sizeof e, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    out += e;
  }
  return out;
}

// -- values -----------------------------------------------------------------------------------

// A string shared between copies: lists and dicts copy their values freely (slices,
// concatenation, iteration), and a hostile template must not turn one large message into a
// million deep copies.
class shared_string {
public:
  shared_string() = default;
  shared_string(std::string s)
      : p_(s.empty() ? nullptr : std::make_shared<const std::string>(std::move(s))) {}
  const std::string& str() const {
    static const std::string empty;
    return p_ ? *p_ : empty;
  }
  operator const std::string&() const { return str(); }
  operator std::string_view() const { return str(); }
  std::size_t size() const { return str().size(); }
  bool empty() const { return str().empty(); }
  const char* c_str() const { return str().c_str(); }
  template <class... A>
  std::size_t find(A&&... a) const {
    return str().find(std::forward<A>(a)...);
  }
  template <class... A>
  std::size_t rfind(A&&... a) const {
    return str().rfind(std::forward<A>(a)...);
  }
  template <class... A>
  int compare(A&&... a) const {
    return str().compare(std::forward<A>(a)...);
  }
  template <class... A>
  std::string substr(A&&... a) const {
    return str().substr(std::forward<A>(a)...);
  }
  char operator[](std::size_t k) const { return str()[k]; }
  bool operator==(const shared_string& o) const { return p_ == o.p_ || str() == o.str(); }
  bool operator==(const std::string& o) const { return str() == o; }

private:
  std::shared_ptr<const std::string> p_;
};

enum class vk : std::uint8_t {
  undefined,
  none,
  boolean,
  integer,
  floating,
  string,
  list,
  dict,
  ns,
  loop,
  callable
};

struct object_base {
  virtual ~object_base() = default;
  std::uint32_t depth = 1;  // nesting below this object; bounded so teardown cannot overflow
};

struct value {
  vk kind = vk::undefined;
  bool b = false;
  std::int64_t i = 0;
  double f = 0;
  shared_string s;  // the string; for undefined, the error text jinja2 would give on use
  std::shared_ptr<object_base> obj;

  static value none() {
    value v;
    v.kind = vk::none;
    return v;
  }
  static value boolean(bool x) {
    value v;
    v.kind = vk::boolean;
    v.b = x;
    return v;
  }
  static value integer(std::int64_t x) {
    value v;
    v.kind = vk::integer;
    v.i = x;
    return v;
  }
  static value floating(double x) {
    value v;
    v.kind = vk::floating;
    v.f = x;
    return v;
  }
  static value string(std::string x) {
    charge(x.size() / 16);
    value v;
    v.kind = vk::string;
    v.s = std::move(x);
    return v;
  }
  static value undefined(std::string hint) {
    value v;
    v.s = std::move(hint);
    return v;
  }

  bool is_undefined() const { return kind == vk::undefined; }
  bool is_number() const {
    return kind == vk::boolean || kind == vk::integer || kind == vk::floating;
  }
  bool is_int_like() const { return kind == vk::boolean || kind == vk::integer; }
  std::int64_t as_int() const { return kind == vk::boolean ? (b ? 1 : 0) : i; }
  double as_double() const { return kind == vk::floating ? f : static_cast<double>(as_int()); }
  std::uint32_t depth() const { return obj ? obj->depth : 0; }
};

struct list_obj : object_base {
  std::vector<value> items;
  bool tuple = false;
};

struct dict_obj : object_base {
  std::vector<std::pair<std::string, value>> items;  // insertion order, as Python keeps it
  std::unordered_map<std::string, std::size_t> index;

  const value* find(const std::string& key) const {
    auto it = index.find(key);
    return it == index.end() ? nullptr : &items[it->second].second;
  }
  void set(const std::string& key, value v) {
    auto it = index.find(key);
    if (it != index.end()) {
      items[it->second].second = std::move(v);
    } else {
      index.emplace(key, items.size());
      items.emplace_back(key, std::move(v));
    }
  }
};

struct namespace_obj : object_base {
  dict_obj attrs;
};

struct loop_obj : object_base {
  std::shared_ptr<const list_obj> items;
  std::size_t index0 = 0;
};

struct stmt;

struct callable_obj : object_base {
  enum class type { builtin, method, macro, cycle, caller } t = type::builtin;
  std::string name;
  value self;                   // the receiver of a bound method, or the loop of loop.cycle
  const stmt* macro = nullptr;  // a macro, or the {% call %} block of a caller
  // caller(): the scope of its {% call %} block, valid only while `alive` is true (a caller
  // stored away and called after its block ended is refused, not a dangling pointer)
  struct scope* block_scope = nullptr;
  std::shared_ptr<bool> alive;
};

void check_depth(std::uint32_t depth) {
  if (depth > max_value_depth)
    fail_plain("value nested deeper than " + std::to_string(max_value_depth) + " levels");
}

value make_list(std::vector<value> items, bool tuple = false) {
  if (items.size() > max_items)
    fail_plain("list longer than " + std::to_string(max_items) + " items");
  charge(items.size());
  auto l = std::make_shared<list_obj>();
  std::uint32_t d = 0;
  for (const auto& v : items)
    d = std::max(d, v.depth());
  l->depth = d + 1;
  check_depth(l->depth);
  l->items = std::move(items);
  l->tuple = tuple;
  value v;
  v.kind = vk::list;
  v.obj = std::move(l);
  return v;
}

value make_dict(std::shared_ptr<dict_obj> d) {
  std::uint32_t depth = 0;
  for (const auto& [k, v] : d->items)
    depth = std::max(depth, v.depth());
  d->depth = depth + 1;
  check_depth(d->depth);
  value v;
  v.kind = vk::dict;
  v.obj = std::move(d);
  return v;
}

value make_callable(callable_obj::type t, std::string name, value self = {},
                    const stmt* macro = nullptr) {
  auto c = std::make_shared<callable_obj>();
  c->t = t;
  c->name = std::move(name);
  c->depth = self.depth() + 1;
  check_depth(c->depth);
  c->self = std::move(self);
  c->macro = macro;
  value v;
  v.kind = vk::callable;
  v.obj = std::move(c);
  return v;
}

const list_obj& as_list(const value& v) {
  return static_cast<const list_obj&>(*v.obj);
}
const dict_obj& as_dict(const value& v) {
  return static_cast<const dict_obj&>(*v.obj);
}
namespace_obj& as_ns(const value& v) {
  return static_cast<namespace_obj&>(*v.obj);
}
const loop_obj& as_loop(const value& v) {
  return static_cast<const loop_obj&>(*v.obj);
}
const callable_obj& as_callable(const value& v) {
  return static_cast<const callable_obj&>(*v.obj);
}

// Python's type names, as error messages and Undefined hints spell them.
std::string type_name(const value& v) {
  switch (v.kind) {
    case vk::undefined:
      return "Undefined";
    case vk::none:
      return "NoneType";
    case vk::boolean:
      return "bool";
    case vk::integer:
      return "int";
    case vk::floating:
      return "float";
    case vk::string:
      return "str";
    case vk::list:
      return as_list(v).tuple ? "tuple" : "list";
    case vk::dict:
      return "dict";
    case vk::ns:
      return "Namespace";
    case vk::loop:
      return "LoopContext";
    case vk::callable:
      return "function";
  }
  return "object";
}

// jinja2's object_type_repr: "dict object", "None", …
std::string object_repr(const value& v) {
  if (v.kind == vk::none)
    return "None";
  return type_name(v) + " object";
}

bool truthy(const value& v) {
  switch (v.kind) {
    case vk::undefined:
    case vk::none:
      return false;
    case vk::boolean:
      return v.b;
    case vk::integer:
      return v.i != 0;
    case vk::floating:
      return v.f != 0;
    case vk::string:
      return !v.s.empty();
    case vk::list:
      return !as_list(v).items.empty();
    case vk::dict:
      return !as_dict(v).items.empty();
    default:
      return true;
  }
}

std::string py_str_repr(const std::string& s) {
  char quote = '\'';
  if (s.find('\'') != std::string::npos && s.find('"') == std::string::npos)
    quote = '"';
  std::string out(1, quote);
  for (char ch : s) {
    unsigned char c = static_cast<unsigned char>(ch);
    if (ch == quote || ch == '\\') {
      out.push_back('\\');
      out.push_back(ch);
    } else if (ch == '\n') {
      out += "\\n";
    } else if (ch == '\r') {
      out += "\\r";
    } else if (ch == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out.push_back(ch);
    }
  }
  out.push_back(quote);
  return out;
}

void append_repr(std::string& out, const value& v);

// Python's str(): what `{{ x }}` prints.
void append_str(std::string& out, const value& v) {
  switch (v.kind) {
    case vk::undefined:
      break;
    case vk::none:
      out += "None";
      break;
    case vk::boolean:
      out += v.b ? "True" : "False";
      break;
    case vk::integer:
      out += std::to_string(v.i);
      break;
    case vk::floating:
      out += py_float_repr(v.f);
      break;
    case vk::string:
      out += v.s;
      break;
    default:
      append_repr(out, v);
      break;
  }
  if (out.size() > max_bytes)
    fail_plain("string longer than " + std::to_string(max_bytes) + " bytes");
}

std::string to_str(const value& v) {
  if (v.kind == vk::string)
    return v.s;
  std::string out;
  append_str(out, v);
  return out;
}

void append_repr(std::string& out, const value& v) {
  switch (v.kind) {
    case vk::undefined:
      out += "Undefined";
      break;
    case vk::string:
      out += py_str_repr(v.s);
      break;
    case vk::list: {
      const auto& l = as_list(v);
      out += l.tuple ? "(" : "[";
      for (std::size_t k = 0; k < l.items.size(); ++k) {
        if (k)
          out += ", ";
        append_repr(out, l.items[k]);
        if (out.size() > max_bytes)
          fail_plain("string too long");
      }
      if (l.tuple && l.items.size() == 1)
        out += ",";
      out += l.tuple ? ")" : "]";
      break;
    }
    case vk::dict: {
      out += "{";
      bool first = true;
      for (const auto& [k, item] : as_dict(v).items) {
        if (!first)
          out += ", ";
        first = false;
        out += py_str_repr(k) + ": ";
        append_repr(out, item);
        if (out.size() > max_bytes)
          fail_plain("string too long");
      }
      out += "}";
      break;
    }
    case vk::ns:
      out += "<Namespace>";
      break;
    case vk::loop: {
      const auto& l = as_loop(v);
      out += "<LoopContext " + std::to_string(l.index0 + 1) + "/" +
             std::to_string(l.items->items.size()) + ">";
      break;
    }
    case vk::callable:
      out += "<function " + as_callable(v).name + ">";
      break;
    default:
      append_str(out, v);
      break;
  }
}

// -- tojson: json.dumps(x, ensure_ascii=False, ...) -------------------------------------------

struct json_style {
  bool indent = false;
  std::string indent_text;
  std::string item_sep = ", ";
  std::string key_sep = ": ";
  bool sort_keys = false;
};

void append_json_string(std::string& out, const std::string& s) {
  out.push_back('"');
  for (char ch : s) {
    unsigned char c = static_cast<unsigned char>(ch);
    switch (ch) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out.push_back(ch);
        }
    }
  }
  out.push_back('"');
}

void append_json(std::string& out, const value& v, const json_style& st, int level) {
  if (out.size() > max_bytes)
    fail_plain("tojson output too long");
  auto newline = [&](int lvl) {
    out.push_back('\n');
    for (int k = 0; k < lvl; ++k)
      out += st.indent_text;
  };
  switch (v.kind) {
    case vk::none:
      out += "null";
      return;
    case vk::boolean:
      out += v.b ? "true" : "false";
      return;
    case vk::integer:
      out += std::to_string(v.i);
      return;
    case vk::floating:
      if (std::isnan(v.f))
        out += "NaN";
      else if (std::isinf(v.f))
        out += v.f > 0 ? "Infinity" : "-Infinity";
      else
        out += py_float_repr(v.f);
      return;
    case vk::string:
      append_json_string(out, v.s);
      return;
    case vk::list: {
      const auto& l = as_list(v);
      if (l.items.empty()) {
        out += "[]";
        return;
      }
      out += "[";
      for (std::size_t k = 0; k < l.items.size(); ++k) {
        if (k)
          out += st.item_sep;
        if (st.indent)
          newline(level + 1);
        append_json(out, l.items[k], st, level + 1);
      }
      if (st.indent)
        newline(level);
      out += "]";
      return;
    }
    case vk::dict: {
      const auto& d = as_dict(v);
      if (d.items.empty()) {
        out += "{}";
        return;
      }
      std::vector<const std::pair<std::string, value>*> order;
      for (const auto& kv : d.items)
        order.push_back(&kv);
      if (st.sort_keys)
        std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->first < b->first; });
      out += "{";
      for (std::size_t k = 0; k < order.size(); ++k) {
        if (k)
          out += st.item_sep;
        if (st.indent)
          newline(level + 1);
        append_json_string(out, order[k]->first);
        out += st.key_sep;
        append_json(out, order[k]->second, st, level + 1);
      }
      if (st.indent)
        newline(level);
      out += "}";
      return;
    }
    default:
      fail_plain("Object of type " + type_name(v) + " is not JSON serializable");
  }
}

// -- comparisons ------------------------------------------------------------------------------

bool equal(const value& a, const value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.kind == vk::floating || b.kind == vk::floating)
      return a.as_double() == b.as_double();
    return a.as_int() == b.as_int();
  }
  if (a.kind != b.kind)
    return false;
  switch (a.kind) {
    case vk::undefined:
    case vk::none:
      return true;
    case vk::string:
      return a.s == b.s;
    case vk::list: {
      const auto& x = as_list(a);
      const auto& y = as_list(b);
      if (x.tuple != y.tuple || x.items.size() != y.items.size())
        return false;
      for (std::size_t k = 0; k < x.items.size(); ++k)
        if (!equal(x.items[k], y.items[k]))
          return false;
      return true;
    }
    case vk::dict: {
      const auto& x = as_dict(a);
      const auto& y = as_dict(b);
      if (x.items.size() != y.items.size())
        return false;
      for (const auto& [k, v] : x.items) {
        const value* o = y.find(k);
        if (!o || !equal(v, *o))
          return false;
      }
      return true;
    }
    default:
      return a.obj == b.obj;
  }
}

// Python's a < b (and the others through it); TypeError for unordered types.
int compare(const value& a, const value& b, const char* op) {
  if (a.is_number() && b.is_number()) {
    if (a.kind == vk::floating || b.kind == vk::floating) {
      double x = a.as_double(), y = b.as_double();
      return x < y ? -1 : x > y ? 1 : 0;
    }
    std::int64_t x = a.as_int(), y = b.as_int();
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.kind == vk::string && b.kind == vk::string) {
    int c = a.s.compare(b.s);  // UTF-8 byte order is code point order
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  if (a.kind == vk::list && b.kind == vk::list && as_list(a).tuple == as_list(b).tuple) {
    const auto& x = as_list(a).items;
    const auto& y = as_list(b).items;
    for (std::size_t k = 0; k < x.size() && k < y.size(); ++k) {
      if (equal(x[k], y[k]))
        continue;
      return compare(x[k], y[k], op);
    }
    return x.size() < y.size() ? -1 : x.size() > y.size() ? 1 : 0;
  }
  if (a.is_undefined())
    fail_plain(a.s);
  if (b.is_undefined())
    fail_plain(b.s);
  fail_plain(std::string("'") + op + "' not supported between instances of '" + type_name(a) +
             "' and '" + type_name(b) + "'");
}

// -- lexer ------------------------------------------------------------------------------------

enum class tt {
  data,
  var_begin,
  var_end,
  block_begin,
  block_end,
  name,
  string,
  integer,
  floating,
  op,
  eof
};

struct token {
  tt type;
  std::string text;  // data, name, string contents or operator
  std::int64_t ival = 0;
  double fval = 0;
  int line = 1;
  std::size_t pos = 0;  // byte offset; the column is worked out only for an error message
};

class lexer {
public:
  explicit lexer(std::string source) : src_(std::move(source)) {
    // jinja2 normalises newlines to "\n" and drops one trailing newline
    // (keep_trailing_newline=False).
    std::string norm;
    norm.reserve(src_.size());
    for (std::size_t k = 0; k < src_.size(); ++k) {
      if (src_[k] == '\r') {
        norm.push_back('\n');
        if (k + 1 < src_.size() && src_[k + 1] == '\n')
          ++k;
      } else {
        norm.push_back(src_[k]);
      }
    }
    if (!norm.empty() && norm.back() == '\n')
      norm.pop_back();
    src_ = std::move(norm);
    for (std::size_t k = 0; k < src_.size(); ++k)
      if (src_[k] == '\n')
        line_starts_.push_back(k + 1);
  }

  std::vector<token> run() {
    std::size_t pos = 0;
    bool line_starting = true;
    const std::size_t n = src_.size();
    while (pos < n) {
      std::size_t open = find_open(pos);
      if (open == std::string::npos) {
        emit_data(pos, src_.substr(pos));
        break;
      }
      char kind = src_[open + 1];
      std::size_t after = open + 2;
      char sign = 0;
      if (after < n && (src_[after] == '-' || src_[after] == '+'))
        sign = src_[after++];
      std::string text = src_.substr(pos, open - pos);

      // {% raw %} … {% endraw %}
      std::size_t raw_body = 0;
      bool is_raw = kind == '%' && match_raw_begin(after, raw_body);

      if (sign == '-') {
        text = rstrip_ws(text);
      } else if (sign != '+' && kind != '{') {
        // lstrip_blocks: a block or comment tag alone after indentation loses the indentation
        std::size_t l_pos = text.rfind('\n');
        l_pos = l_pos == std::string::npos ? 0 : l_pos + 1;
        if ((l_pos > 0 || line_starting) && l_pos < text.size() && all_ws(text, l_pos))
          text.erase(l_pos);
      }
      emit_data(pos, std::move(text));

      if (is_raw) {
        pos = lex_raw(raw_body, open);
        line_starting = pos > 0 && src_[pos - 1] == '\n';
        continue;
      }
      if (kind == '#') {
        pos = lex_comment(after, open);
      } else {
        pos = lex_tag(kind == '{', after, open);
      }
      line_starting = pos > 0 && src_[pos - 1] == '\n';
    }
    token eof{tt::eof, "", 0, 0, 0, 0};
    locate(n, eof);
    toks_.push_back(std::move(eof));
    return std::move(toks_);
  }

private:
  [[noreturn]] void fail_at(std::size_t pos, const std::string& what) {
    token t{tt::eof, "", 0, 0, 0, 0};
    locate(pos, t);
    fail_plain("chat template syntax error at line " + std::to_string(t.line) + ", column " +
               std::to_string(column(pos)) + ": " + what);
  }

public:
  // 1-based, in characters
  int column(std::size_t pos) const {
    auto it = std::upper_bound(line_starts_.begin(), line_starts_.end(), pos);
    std::size_t idx = static_cast<std::size_t>(it - line_starts_.begin());
    std::size_t start = idx == 0 ? 0 : line_starts_[idx - 1];
    return static_cast<int>(utf8_length(std::string_view(src_).substr(start, pos - start))) + 1;
  }

private:
  void locate(std::size_t pos, token& t) const {
    auto it = std::upper_bound(line_starts_.begin(), line_starts_.end(), pos);
    t.line = static_cast<int>(it - line_starts_.begin()) + 1;
    t.pos = pos;
  }

  std::size_t find_open(std::size_t pos) const {
    while (true) {
      std::size_t k = src_.find('{', pos);
      if (k == std::string::npos || k + 1 >= src_.size())
        return std::string::npos;
      char c = src_[k + 1];
      if (c == '{' || c == '%' || c == '#')
        return k;
      pos = k + 1;
    }
  }

  static bool is_ws(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
  }
  static std::string rstrip_ws(const std::string& s) {
    std::size_t e = s.size();
    while (e > 0 && is_ws(s[e - 1]))
      --e;
    return s.substr(0, e);
  }
  static bool all_ws(const std::string& s, std::size_t from) {
    for (std::size_t k = from; k < s.size(); ++k)
      if (!is_ws(s[k]))
        return false;
    return true;
  }
  std::size_t skip_ws(std::size_t p) const {
    while (p < src_.size() && is_ws(src_[p]))
      ++p;
    return p;
  }

  void emit_data(std::size_t pos, std::string text) {
    if (text.empty())
      return;
    token t{tt::data, std::move(text), 0, 0, 0, 0};
    locate(pos, t);
    toks_.push_back(std::move(t));
  }

  // After "{%" and its sign: `\s*raw\s*(-%}\s*|%})`; sets where the raw body starts.
  bool match_raw_begin(std::size_t p, std::size_t& body) const {
    p = skip_ws(p);
    if (src_.compare(p, 3, "raw") != 0)
      return false;
    p += 3;
    if (p < src_.size() && (std::isalnum(static_cast<unsigned char>(src_[p])) || src_[p] == '_'))
      return false;
    p = skip_ws(p);
    if (src_.compare(p, 3, "-%}") == 0) {
      body = skip_ws(p + 3);
      return true;
    }
    if (src_.compare(p, 2, "%}") == 0) {
      body = p + 2;
      return true;
    }
    return false;
  }

  std::size_t lex_raw(std::size_t body, std::size_t open) {
    std::size_t p = body;
    while (true) {
      std::size_t k = src_.find("{%", p);
      if (k == std::string::npos)
        fail_at(open, "missing end of raw directive ('endraw')");
      std::size_t q = k + 2;
      char sign = 0;
      if (q < src_.size() && (src_[q] == '-' || src_[q] == '+'))
        sign = src_[q++];
      q = skip_ws(q);
      if (src_.compare(q, 6, "endraw") == 0) {
        std::size_t e = skip_ws(q + 6);
        std::size_t end = std::string::npos;
        if (src_.compare(e, 3, "+%}") == 0)
          end = e + 3;
        else if (src_.compare(e, 3, "-%}") == 0)
          end = skip_ws(e + 3);
        else if (src_.compare(e, 2, "%}") == 0) {
          end = e + 2;
          if (end < src_.size() && src_[end] == '\n')
            ++end;
        }
        if (end != std::string::npos) {
          std::string text = src_.substr(body, k - body);
          if (sign == '-') {
            text = rstrip_ws(text);
          } else if (sign != '+') {
            std::size_t l_pos = text.rfind('\n');
            l_pos = l_pos == std::string::npos ? 0 : l_pos + 1;
            if (l_pos > 0 && l_pos < text.size() && all_ws(text, l_pos))
              text.erase(l_pos);
          }
          emit_data(body, std::move(text));
          return end;
        }
      }
      p = k + 2;
    }
  }

  std::size_t lex_comment(std::size_t body, std::size_t open) {
    std::size_t p = body;
    while (true) {
      std::size_t k = src_.find("#}", p);
      if (k == std::string::npos)
        fail_at(open, "missing end of comment tag ('#}')");
      if (k > body && src_[k - 1] == '-')
        return skip_ws(k + 2);
      if (k > body && src_[k - 1] == '+')
        return k + 2;
      std::size_t end = k + 2;
      if (end < src_.size() && src_[end] == '\n')
        ++end;  // trim_blocks
      return end;
    }
  }

  static bool name_start(char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_'; }
  static bool name_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

  std::size_t lex_tag(bool variable, std::size_t p, std::size_t open) {
    {
      token t{variable ? tt::var_begin : tt::block_begin, "", 0, 0, 0, 0};
      locate(open, t);
      toks_.push_back(std::move(t));
    }
    std::vector<char> balance;
    const std::size_t n = src_.size();
    while (true) {
      p = skip_ws(p);
      if (p >= n)
        fail_at(open, std::string("unexpected end of template, expected '") +
                          (variable ? "}}" : "%}") + "' to close the tag");
      if (balance.empty()) {
        std::size_t end = std::string::npos;
        if (variable) {
          if (src_.compare(p, 3, "-}}") == 0)
            end = skip_ws(p + 3);
          else if (src_.compare(p, 2, "}}") == 0)
            end = p + 2;
        } else {
          if (src_.compare(p, 3, "+%}") == 0)
            end = p + 3;
          else if (src_.compare(p, 3, "-%}") == 0)
            end = skip_ws(p + 3);
          else if (src_.compare(p, 2, "%}") == 0) {
            end = p + 2;
            if (end < n && src_[end] == '\n')
              ++end;  // trim_blocks
          }
        }
        if (end != std::string::npos) {
          token t{variable ? tt::var_end : tt::block_end, "", 0, 0, 0, 0};
          locate(p, t);
          toks_.push_back(std::move(t));
          return end;
        }
      }
      token t{tt::op, "", 0, 0, 0, 0};
      locate(p, t);
      char c = src_[p];
      if (name_start(c)) {
        std::size_t q = p;
        while (q < n && name_char(src_[q]))
          ++q;
        t.type = tt::name;
        t.text = src_.substr(p, q - p);
        p = q;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        p = lex_number(p, t);
      } else if (c == '\'' || c == '"') {
        p = lex_string(p, t);
      } else {
        static const char* ops2[] = {"//", "**", "==", "!=", ">=", "<="};
        std::string op;
        for (const char* o : ops2)
          if (src_.compare(p, 2, o) == 0)
            op = o;
        if (op.empty()) {
          if (std::strchr("+-/*%~[](){}><=.:|,;", c) == nullptr || c == 0)
            fail_at(p, std::string("unexpected character '") + c + "'");
          op = std::string(1, c);
        }
        if (op == "(" || op == "[" || op == "{") {
          balance.push_back(op == "(" ? ')' : op == "[" ? ']' : '}');
          if (balance.size() > static_cast<std::size_t>(max_parse_nesting))
            fail_at(p, "brackets nested too deeply");
        } else if (op == ")" || op == "]" || op == "}") {
          if (balance.empty())
            fail_at(p, "unexpected '" + op + "'");
          if (balance.back() != op[0])
            fail_at(p,
                    "unexpected '" + op + "', expected '" + std::string(1, balance.back()) + "'");
          balance.pop_back();
        }
        t.text = op;
        p += op.size();
      }
      toks_.push_back(std::move(t));
    }
  }

  std::size_t lex_number(std::size_t p, token& t) {
    const std::size_t n = src_.size();
    auto digits = [&](std::size_t q) {
      while (q < n && (std::isdigit(static_cast<unsigned char>(src_[q])) ||
                       (src_[q] == '_' && q + 1 < n &&
                        std::isdigit(static_cast<unsigned char>(src_[q + 1])))))
        ++q;
      return q;
    };
    std::size_t q = digits(p);
    bool is_float = false;
    if (q + 1 < n && src_[q] == '.' && std::isdigit(static_cast<unsigned char>(src_[q + 1]))) {
      q = digits(q + 1);
      is_float = true;
    }
    if (q < n && (src_[q] == 'e' || src_[q] == 'E')) {
      std::size_t r = q + 1;
      if (r < n && (src_[r] == '+' || src_[r] == '-'))
        ++r;
      if (r < n && std::isdigit(static_cast<unsigned char>(src_[r]))) {
        q = digits(r);
        is_float = true;
      }
    }
    std::string text;
    for (std::size_t k = p; k < q; ++k)
      if (src_[k] != '_')
        text.push_back(src_[k]);
    if (is_float) {
      t.type = tt::floating;
      t.fval = std::strtod(text.c_str(), nullptr);
    } else {
      t.type = tt::integer;
      auto res = std::from_chars(text.data(), text.data() + text.size(), t.ival);
      if (res.ec != std::errc{})
        fail_at(p, "integer literal too large: " + text);
    }
    t.text = text;
    return q;
  }

  // Python's unicode-escape rules for the escapes; unknown escapes stay as written.
  std::size_t lex_string(std::size_t p, token& t) {
    const char quote = src_[p];
    const std::size_t n = src_.size();
    std::string out;
    std::size_t q = p + 1;
    auto hex = [&](std::size_t at, int count, std::uint32_t& cp) {
      if (at + count > n)
        return false;
      cp = 0;
      for (int k = 0; k < count; ++k) {
        char c = src_[at + k];
        int d = std::isdigit(static_cast<unsigned char>(c)) ? c - '0'
                : (c >= 'a' && c <= 'f')                    ? c - 'a' + 10
                : (c >= 'A' && c <= 'F')                    ? c - 'A' + 10
                                                            : -1;
        if (d < 0)
          return false;
        cp = cp * 16 + d;
      }
      return true;
    };
    while (true) {
      if (q >= n)
        fail_at(p, "unterminated string literal");
      char c = src_[q];
      if (c == quote)
        break;
      if (c != '\\') {
        out.push_back(c);
        ++q;
        continue;
      }
      if (q + 1 >= n)
        fail_at(p, "unterminated string literal");
      char e = src_[q + 1];
      q += 2;
      switch (e) {
        case 'n':
          out.push_back('\n');
          break;
        case 't':
          out.push_back('\t');
          break;
        case 'r':
          out.push_back('\r');
          break;
        case '\\':
          out.push_back('\\');
          break;
        case '\'':
          out.push_back('\'');
          break;
        case '"':
          out.push_back('"');
          break;
        case 'a':
          out.push_back('\a');
          break;
        case 'b':
          out.push_back('\b');
          break;
        case 'f':
          out.push_back('\f');
          break;
        case 'v':
          out.push_back('\v');
          break;
        case '\n':
          break;  // a backslash-newline continues the line
        case 'x':
        case 'u':
        case 'U': {
          int count = e == 'x' ? 2 : e == 'u' ? 4 : 8;
          std::uint32_t cp = 0;
          if (!hex(q, count, cp) || cp > 0x10FFFF)
            fail_at(q - 2, std::string("truncated \\") + e + " escape in string literal");
          append_utf8(out, cp);
          q += count;
          break;
        }
        default:
          if (e >= '0' && e <= '7') {
            std::uint32_t cp = e - '0';
            for (int k = 0; k < 2 && q < n && src_[q] >= '0' && src_[q] <= '7'; ++k)
              cp = cp * 8 + (src_[q++] - '0');
            append_utf8(out, cp);
          } else {
            out.push_back('\\');
            out.push_back(e);
          }
      }
    }
    t.type = tt::string;
    t.text = std::move(out);
    return q + 1;
  }

  std::string src_;
  std::vector<std::size_t> line_starts_;
  std::vector<token> toks_;
};

// -- AST --------------------------------------------------------------------------------------

enum class ek {
  literal,
  name,
  getattr,
  getitem,
  slice,
  call,
  filter,
  test,
  neg,
  pos,
  not_,
  and_,
  or_,
  binop,
  concat,
  compare,
  cond,
  list,
  tuple,
  dict,
  placeholder,
  splat
};

struct expr;
using expr_ptr = std::unique_ptr<expr>;

struct expr {
  ek kind = ek::literal;
  int line = 0;
  int depth = 1;
  value lit;
  std::string name;            // variable, attribute, filter or test name; operator of a binop
  std::vector<expr_ptr> args;  // children; their meaning depends on kind (see parser)
  std::vector<std::string> kwnames;
  std::vector<expr_ptr> kwargs;
  std::vector<std::string> ops;  // compare: the operator before each args[k + 1]
};

enum class sk {
  data,
  output,
  if_,
  for_,
  set,
  set_ns,
  set_block,
  macro,
  break_,
  continue_,
  filter_block,
  with,
  block,
  call_block
};

struct stmt;
using body_t = std::vector<std::unique_ptr<stmt>>;

struct stmt {
  sk kind = sk::data;
  int line = 0;
  std::string text;                  // data; macro name
  std::vector<std::string> targets;  // for / set / with targets; set_ns: namespace name
  std::string attr;                  // set_ns attribute
  expr_ptr e;                        // output, for iterable, set value, filter chain
  expr_ptr cond;                     // for … if cond
  std::vector<expr_ptr> conds;       // if / elif tests; with values
  std::vector<body_t> bodies;        // if / elif bodies
  body_t body, else_body;
  std::vector<expr_ptr> defaults;  // macro / caller parameter defaults (nullptr = required)
  bool uses_varargs = false;       // a macro whose body names varargs / kwargs
  bool uses_kwargs = false;
};

}  // namespace

struct chat_template::program {
  body_t body;
};

namespace {

// -- parser -----------------------------------------------------------------------------------

class parser {
public:
  parser(std::vector<token> toks, const lexer& lex) : toks_(std::move(toks)), lex_(lex) {}

  body_t parse_template() {
    std::string tag;
    return parse_body({}, tag);
  }

private:
  struct nesting_guard {
    parser& p;
    explicit nesting_guard(parser& pp) : p(pp) {
      if (++p.nesting_ > max_parse_nesting)
        p.fail(p.cur(), "template nested too deeply");
    }
    ~nesting_guard() { --p.nesting_; }
  };

  const token& cur() const { return toks_[pos_]; }
  const token& peek(std::size_t k = 1) const { return toks_[std::min(pos_ + k, toks_.size() - 1)]; }
  void advance() {
    if (pos_ + 1 < toks_.size())
      ++pos_;
  }
  bool is_op(const char* s) const { return cur().type == tt::op && cur().text == s; }
  bool is_name(const char* s) const { return cur().type == tt::name && cur().text == s; }

  static std::string describe(const token& t) {
    switch (t.type) {
      case tt::data:
        return "template text";
      case tt::var_begin:
        return "'{{'";
      case tt::var_end:
        return "'}}'";
      case tt::block_begin:
        return "'{%'";
      case tt::block_end:
        return "'%}'";
      case tt::name:
        return "'" + t.text + "'";
      case tt::string:
        return "a string";
      case tt::integer:
      case tt::floating:
        return "a number";
      case tt::op:
        return "'" + t.text + "'";
      case tt::eof:
        return "the end of the template";
    }
    return "a token";
  }

  [[noreturn]] void fail(const token& t, const std::string& what) {
    fail_plain("chat template syntax error at line " + std::to_string(t.line) + ", column " +
               std::to_string(lex_.column(t.pos)) + ": " + what);
  }
  [[noreturn]] void fail_expected(const std::string& expected) {
    fail(cur(), "expected " + expected + ", got " + describe(cur()));
  }

  void expect_op(const char* s) {
    if (!is_op(s))
      fail_expected(std::string("'") + s + "'");
    advance();
  }
  std::string expect_name(const char* what) {
    if (cur().type != tt::name)
      fail_expected(what);
    std::string n = cur().text;
    advance();
    return n;
  }
  void expect_block_end(const char* after) {
    if (cur().type != tt::block_end)
      fail_expected(std::string("'%}' after ") + after);
    advance();
  }

  expr_ptr node(ek kind, int line) {
    auto e = std::make_unique<expr>();
    e->kind = kind;
    e->line = line;
    return e;
  }
  expr_ptr finish(expr_ptr e) {
    int d = 0;
    for (const auto& a : e->args)
      if (a)
        d = std::max(d, a->depth);
    for (const auto& a : e->kwargs)
      if (a)
        d = std::max(d, a->depth);
    e->depth = d + 1;
    if (e->depth > max_ast_depth)
      fail(cur(), "expression nested too deeply");
    return e;
  }

  // ---- statements ----

  static std::string join_tags(const std::vector<const char*>& tags) {
    std::string s;
    for (std::size_t k = 0; k < tags.size(); ++k) {
      if (k)
        s += k + 1 == tags.size() ? " or " : ", ";
      s += std::string("'") + tags[k] + "'";
    }
    return s;
  }

  // Parses until `{% <one of end_tags>`; leaves the position after the tag name.
  body_t parse_body(const std::vector<const char*>& end_tags, std::string& found) {
    nesting_guard guard(*this);
    body_t body;
    while (true) {
      const token& t = cur();
      if (t.type == tt::eof) {
        if (end_tags.empty())
          return body;
        fail(t, "unexpected end of template, expected " + join_tags(end_tags) +
                    (open_line_ ? " to close the block opened at line " + std::to_string(open_line_)
                                : ""));
      }
      if (t.type == tt::data) {
        auto s = std::make_unique<stmt>();
        s->kind = sk::data;
        s->line = t.line;
        s->text = t.text;
        body.push_back(std::move(s));
        advance();
      } else if (t.type == tt::var_begin) {
        auto s = std::make_unique<stmt>();
        s->kind = sk::output;
        s->line = t.line;
        advance();
        s->e = parse_tuple(true, {});
        if (cur().type != tt::var_end)
          fail_expected("'}}'");
        advance();
        body.push_back(std::move(s));
      } else if (t.type == tt::block_begin) {
        const token& tag = peek();
        if (tag.type == tt::name) {
          for (const char* end : end_tags) {
            if (tag.text == end) {
              found = end;
              advance();
              advance();
              return body;
            }
          }
        }
        advance();
        body.push_back(parse_statement(end_tags));
      } else {
        fail(t, "unexpected " + describe(t));
      }
    }
  }

  std::unique_ptr<stmt> parse_statement(const std::vector<const char*>& enclosing) {
    const token& t = cur();
    if (t.type != tt::name)
      fail_expected("a tag name");
    std::string tag = t.text;
    int line = t.line;
    advance();
    auto s = std::make_unique<stmt>();
    s->line = line;
    int saved_open = open_line_;
    open_line_ = line;
    std::string found;
    if (tag == "if") {
      s->kind = sk::if_;
      s->conds.push_back(parse_tuple(false, {}));
      expect_block_end("the 'if' test");
      s->bodies.push_back(parse_body({"elif", "else", "endif"}, found));
      while (found == "elif") {
        s->conds.push_back(parse_tuple(false, {}));
        expect_block_end("the 'elif' test");
        s->bodies.push_back(parse_body({"elif", "else", "endif"}, found));
      }
      if (found == "else") {
        expect_block_end("'else'");
        s->else_body = parse_body({"endif"}, found);
      }
      expect_block_end("'endif'");
    } else if (tag == "for") {
      s->kind = sk::for_;
      s->targets = parse_targets("for");
      if (!is_name("in"))
        fail_expected("'in' after the loop variable");
      advance();
      s->e = parse_tuple(false, {"recursive"});
      if (is_name("if")) {
        advance();
        s->cond = parse_expression(true);
      }
      if (is_name("recursive"))
        fail(cur(), "recursive for loops are not supported");
      expect_block_end("the 'for' header");
      ++loop_depth_;
      s->body = parse_body({"endfor", "else"}, found);
      --loop_depth_;
      if (found == "else") {
        expect_block_end("'else'");
        s->else_body = parse_body({"endfor"}, found);
      }
      expect_block_end("'endfor'");
    } else if (tag == "set") {
      if (cur().type == tt::name && peek().type == tt::op && peek().text == ".") {
        s->kind = sk::set_ns;
        s->targets.push_back(cur().text);
        advance();
        advance();
        s->attr = expect_name("an attribute name after '.'");
        expect_op("=");
        s->e = parse_tuple(true, {});
        expect_block_end("the 'set' value");
      } else {
        s->targets = parse_targets("set");
        if (is_op("=")) {
          advance();
          s->kind = sk::set;
          s->e = parse_tuple(true, {});
          expect_block_end("the 'set' value");
        } else {
          if (s->targets.size() != 1)
            fail_expected("'='");
          s->kind = sk::set_block;
          if (is_op("|"))
            s->e = parse_filter_chain(line);
          expect_block_end("the 'set' target");
          s->body = parse_body({"endset"}, found);
          expect_block_end("'endset'");
        }
      }
    } else if (tag == "macro") {
      s->kind = sk::macro;
      s->text = expect_name("the macro name");
      parse_signature(*s);
      expect_block_end("the macro signature");
      int saved_loops = loop_depth_;
      loop_depth_ = 0;
      std::vector<std::string> saved_names;
      std::swap(saved_names, names_seen_);
      s->body = parse_body({"endmacro"}, found);
      for (const auto& n : names_seen_) {
        s->uses_varargs = s->uses_varargs || n == "varargs";
        s->uses_kwargs = s->uses_kwargs || n == "kwargs";
      }
      names_seen_.insert(names_seen_.end(), saved_names.begin(), saved_names.end());
      loop_depth_ = saved_loops;
      if (cur().type == tt::name)
        advance();  // `{% endmacro name %}`
      expect_block_end("'endmacro'");
    } else if (tag == "call") {
      // {% call(params) macro(args) %}body{% endcall %}: the macro gets caller()
      s->kind = sk::call_block;
      if (is_op("("))
        parse_signature(*s);
      s->e = parse_expression(true);
      if (s->e->kind != ek::call)
        fail(t, "a 'call' block needs a macro call");
      expect_block_end("the 'call' expression");
      int saved_loops = loop_depth_;
      loop_depth_ = 0;
      s->body = parse_body({"endcall"}, found);
      loop_depth_ = saved_loops;
      expect_block_end("'endcall'");
    } else if (tag == "break" || tag == "continue") {
      if (loop_depth_ == 0)
        fail(t, "'" + tag + "' outside of a for loop");
      s->kind = tag == "break" ? sk::break_ : sk::continue_;
      expect_block_end(tag == "break" ? "'break'" : "'continue'");
    } else if (tag == "filter") {
      s->kind = sk::filter_block;
      s->e = parse_filter_chain(line, false);
      expect_block_end("the filter");
      s->body = parse_body({"endfilter"}, found);
      expect_block_end("'endfilter'");
    } else if (tag == "with") {
      s->kind = sk::with;
      while (cur().type != tt::block_end) {
        if (!s->targets.empty())
          expect_op(",");
        s->targets.push_back(expect_name("a variable name"));
        expect_op("=");
        s->conds.push_back(parse_expression(true));
      }
      advance();
      s->body = parse_body({"endwith"}, found);
      expect_block_end("'endwith'");
    } else if (tag == "generation") {
      // transformers' {% generation %} marks assistant text; it renders its body unchanged
      s->kind = sk::block;
      expect_block_end("'generation'");
      s->body = parse_body({"endgeneration"}, found);
      expect_block_end("'endgeneration'");
    } else {
      std::string msg = "unknown tag '" + tag + "'";
      if (!enclosing.empty())
        msg += ", expected " + join_tags(enclosing);
      if (tag == "include" || tag == "import" || tag == "extends" || tag == "from" ||
          tag == "block" || tag == "do")
        msg = "the '" + tag + "' tag is not supported in chat templates";
      fail(t, msg);
    }
    open_line_ = saved_open;
    return s;
  }

  void parse_signature(stmt& s) {
    expect_op("(");
    while (!is_op(")")) {
      if (!s.targets.empty())
        expect_op(",");
      if (is_op(")"))
        break;
      s.targets.push_back(expect_name("a parameter name"));
      if (is_op("=")) {
        advance();
        s.defaults.push_back(parse_expression(true));
      } else {
        s.defaults.push_back(nullptr);
      }
    }
    advance();
  }

  std::vector<std::string> parse_targets(const char* what) {
    std::vector<std::string> names;
    bool paren = is_op("(");
    if (paren)
      advance();
    while (true) {
      names.push_back(expect_name((std::string("a variable name after '") + what + "'").c_str()));
      if (!is_op(","))
        break;
      advance();
      if (cur().type != tt::name)
        break;
    }
    if (paren)
      expect_op(")");
    return names;
  }

  // `| f(args) | g` applied to a placeholder (for filter blocks and block set).
  expr_ptr parse_filter_chain(int line, bool leading_pipe = true) {
    auto e = node(ek::placeholder, line);
    bool first = true;
    while (is_op("|") || (!leading_pipe && first)) {
      if (is_op("|"))
        advance();
      first = false;
      e = parse_filter(std::move(e));
    }
    return e;
  }

  // ---- expressions (the order of jinja2's parser) ----

  bool is_tuple_end(const std::vector<const char*>& extra) const {
    if (cur().type == tt::var_end || cur().type == tt::block_end || cur().type == tt::eof)
      return true;
    if (is_op(")"))
      return true;
    for (const char* n : extra)
      if (is_name(n))
        return true;
    return false;
  }

  expr_ptr parse_tuple(bool with_condexpr, const std::vector<const char*>& extra,
                       bool explicit_parens = false) {
    int line = cur().line;
    std::vector<expr_ptr> items;
    bool is_tuple = false;
    while (true) {
      if (!items.empty())
        expect_op(",");
      if (is_tuple_end(extra))
        break;
      items.push_back(parse_expression(with_condexpr));
      if (is_op(","))
        is_tuple = true;
      else
        break;
    }
    if (!is_tuple) {
      if (items.empty()) {
        if (!explicit_parens)
          fail_expected("an expression");
      } else {
        return std::move(items[0]);
      }
    }
    auto t = node(ek::tuple, line);
    t->args = std::move(items);
    return finish(std::move(t));
  }

  expr_ptr parse_expression(bool with_condexpr) {
    nesting_guard guard(*this);
    if (!with_condexpr)
      return parse_or();
    int line = cur().line;
    expr_ptr e = parse_or();
    while (is_name("if")) {
      advance();
      auto c = node(ek::cond, line);
      expr_ptr test = parse_or();
      expr_ptr otherwise;
      if (is_name("else")) {
        advance();
        otherwise = parse_expression(true);
      }
      c->args.push_back(std::move(e));
      c->args.push_back(std::move(test));
      c->args.push_back(std::move(otherwise));
      e = finish(std::move(c));
    }
    return e;
  }

  expr_ptr binary(ek kind, expr_ptr l, expr_ptr r, int line, std::string op = {}) {
    auto e = node(kind, line);
    e->name = std::move(op);
    e->args.push_back(std::move(l));
    e->args.push_back(std::move(r));
    return finish(std::move(e));
  }

  expr_ptr parse_or() {
    expr_ptr l = parse_and();
    while (is_name("or")) {
      int line = cur().line;
      advance();
      l = binary(ek::or_, std::move(l), parse_and(), line);
    }
    return l;
  }

  expr_ptr parse_and() {
    expr_ptr l = parse_not();
    while (is_name("and")) {
      int line = cur().line;
      advance();
      l = binary(ek::and_, std::move(l), parse_not(), line);
    }
    return l;
  }

  expr_ptr parse_not() {
    if (is_name("not")) {
      nesting_guard guard(*this);
      int line = cur().line;
      advance();
      auto e = node(ek::not_, line);
      e->args.push_back(parse_not());
      return finish(std::move(e));
    }
    return parse_compare();
  }

  expr_ptr parse_compare() {
    int line = cur().line;
    expr_ptr first = parse_math1();
    expr_ptr cmp;
    while (true) {
      std::string op;
      if (cur().type == tt::op && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                   cur().text == ">" || cur().text == "<=" || cur().text == ">=")) {
        op = cur().text;
        advance();
      } else if (is_name("in")) {
        op = "in";
        advance();
      } else if (is_name("not") && peek().type == tt::name && peek().text == "in") {
        op = "not in";
        advance();
        advance();
      } else {
        break;
      }
      if (!cmp) {
        cmp = node(ek::compare, line);
        cmp->args.push_back(std::move(first));
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(parse_math1());
      if (cmp->args.size() > max_items)
        fail(cur(), "expression too long");
    }
    return cmp ? finish(std::move(cmp)) : std::move(first);
  }

  expr_ptr parse_math1() {
    expr_ptr l = parse_concat();
    while (is_op("+") || is_op("-")) {
      std::string op = cur().text;
      int line = cur().line;
      advance();
      l = binary(ek::binop, std::move(l), parse_concat(), line, op);
    }
    return l;
  }

  expr_ptr parse_concat() {
    int line = cur().line;
    expr_ptr first = parse_math2();
    if (!is_op("~"))
      return first;
    auto c = node(ek::concat, line);
    c->args.push_back(std::move(first));
    while (is_op("~")) {
      advance();
      c->args.push_back(parse_math2());
      if (c->args.size() > max_items)
        fail(cur(), "expression too long");
    }
    return finish(std::move(c));
  }

  expr_ptr parse_math2() {
    expr_ptr l = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      std::string op = cur().text;
      int line = cur().line;
      advance();
      l = binary(ek::binop, std::move(l), parse_pow(), line, op);
    }
    return l;
  }

  expr_ptr parse_pow() {
    expr_ptr l = parse_unary(true);
    while (is_op("**")) {
      int line = cur().line;
      advance();
      l = binary(ek::binop, std::move(l), parse_unary(true), line, "**");
    }
    return l;
  }

  expr_ptr parse_unary(bool with_filter) {
    nesting_guard guard(*this);
    int line = cur().line;
    expr_ptr e;
    if (is_op("-") || is_op("+")) {
      bool neg = is_op("-");
      advance();
      e = node(neg ? ek::neg : ek::pos, line);
      e->args.push_back(parse_unary(false));
      e = finish(std::move(e));
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter)
      e = parse_filter_expr(std::move(e));
    return e;
  }

  expr_ptr parse_primary() {
    const token& t = cur();
    int line = t.line;
    if (t.type == tt::name) {
      const std::string& n = t.text;
      auto e = node(ek::literal, line);
      if (n == "true" || n == "True")
        e->lit = value::boolean(true);
      else if (n == "false" || n == "False")
        e->lit = value::boolean(false);
      else if (n == "none" || n == "None")
        e->lit = value::none();
      else {
        e->kind = ek::name;
        e->name = n;
        if (n == "varargs" || n == "kwargs")
          names_seen_.push_back(n);
      }
      advance();
      return e;
    }
    if (t.type == tt::string) {
      std::string s;
      while (cur().type == tt::string) {
        s += cur().text;
        advance();
      }
      auto e = node(ek::literal, line);
      e->lit = value::string(std::move(s));
      return e;
    }
    if (t.type == tt::integer || t.type == tt::floating) {
      auto e = node(ek::literal, line);
      e->lit = t.type == tt::integer ? value::integer(t.ival) : value::floating(t.fval);
      advance();
      return e;
    }
    if (is_op("(")) {
      advance();
      expr_ptr e = parse_tuple(true, {}, true);
      expect_op(")");
      return e;
    }
    if (is_op("[")) {
      advance();
      auto e = node(ek::list, line);
      while (!is_op("]")) {
        if (!e->args.empty())
          expect_op(",");
        if (is_op("]"))
          break;
        e->args.push_back(parse_expression(true));
      }
      advance();
      return finish(std::move(e));
    }
    if (is_op("{")) {
      advance();
      auto e = node(ek::dict, line);
      while (!is_op("}")) {
        if (!e->args.empty())
          expect_op(",");
        if (is_op("}"))
          break;
        e->args.push_back(parse_expression(true));
        expect_op(":");
        e->args.push_back(parse_expression(true));
      }
      advance();
      return finish(std::move(e));
    }
    fail_expected("an expression");
  }

  expr_ptr parse_postfix(expr_ptr e) {
    while (true) {
      if (is_op(".") || is_op("[")) {
        e = parse_subscript(std::move(e));
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  expr_ptr parse_filter_expr(expr_ptr e) {
    while (true) {
      if (is_op("|")) {
        advance();
        e = parse_filter(std::move(e));
      } else if (is_name("is")) {
        e = parse_test(std::move(e));
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  expr_ptr parse_subscript(expr_ptr obj) {
    int line = cur().line;
    if (is_op(".")) {
      advance();
      if (cur().type == tt::name) {
        auto e = node(ek::getattr, line);
        e->name = cur().text;
        advance();
        e->args.push_back(std::move(obj));
        return finish(std::move(e));
      }
      if (cur().type == tt::integer) {
        auto e = node(ek::getitem, line);
        auto key = node(ek::literal, line);
        key->lit = value::integer(cur().ival);
        advance();
        e->args.push_back(std::move(obj));
        e->args.push_back(std::move(key));
        return finish(std::move(e));
      }
      fail_expected("an attribute name after '.'");
    }
    advance();  // '['
    nesting_guard guard(*this);
    std::vector<expr_ptr> parts;
    bool is_slice = false;
    expr_ptr start, stop, step;
    if (!is_op(":"))
      start = parse_expression(true);
    if (is_op(":")) {
      is_slice = true;
      advance();
      if (!is_op("]") && !is_op(":"))
        stop = parse_expression(true);
      if (is_op(":")) {
        advance();
        if (!is_op("]"))
          step = parse_expression(true);
      }
    } else if (is_op(",")) {
      fail(cur(), "tuple subscripts are not supported");
    }
    expect_op("]");
    if (is_slice) {
      auto e = node(ek::slice, line);
      e->args.push_back(std::move(obj));
      e->args.push_back(std::move(start));
      e->args.push_back(std::move(stop));
      e->args.push_back(std::move(step));
      return finish(std::move(e));
    }
    auto e = node(ek::getitem, line);
    e->args.push_back(std::move(obj));
    e->args.push_back(std::move(start));
    return finish(std::move(e));
  }

  void parse_call_args(expr& e) {
    nesting_guard guard(*this);
    expect_op("(");
    bool any = false;
    while (!is_op(")")) {
      if (any)
        expect_op(",");
      if (is_op(")"))
        break;
      any = true;
      if (is_op("*")) {
        auto star = node(ek::splat, cur().line);
        advance();
        star->args.push_back(parse_expression(true));
        e.args.push_back(finish(std::move(star)));
        continue;
      }
      if (is_op("**")) {
        advance();
        e.kwnames.push_back("**");
        e.kwargs.push_back(parse_expression(true));
        continue;
      }
      if (cur().type == tt::name && peek().type == tt::op && peek().text == "=") {
        e.kwnames.push_back(cur().text);
        advance();
        advance();
        e.kwargs.push_back(parse_expression(true));
      } else {
        if (!e.kwargs.empty() && e.kwnames.back() != "**")
          fail(cur(), "positional argument after a keyword argument");
        e.args.push_back(parse_expression(true));
      }
    }
    advance();
  }

  expr_ptr parse_call(expr_ptr callee) {
    auto e = node(ek::call, cur().line);
    e->args.push_back(std::move(callee));
    parse_call_args(*e);
    return finish(std::move(e));
  }

  std::string dotted_name(const char* what) {
    std::string n = expect_name(what);
    while (is_op(".") && peek().type == tt::name) {
      advance();
      n += "." + cur().text;
      advance();
    }
    return n;
  }

  expr_ptr parse_filter(expr_ptr operand) {
    auto e = node(ek::filter, cur().line);
    e->name = dotted_name("a filter name after '|'");
    e->args.push_back(std::move(operand));
    if (is_op("("))
      parse_call_args(*e);
    return finish(std::move(e));
  }

  expr_ptr parse_test(expr_ptr operand) {
    int line = cur().line;
    advance();  // 'is'
    bool negated = false;
    if (is_name("not")) {
      negated = true;
      advance();
    }
    auto e = node(ek::test, line);
    e->name = dotted_name("a test name after 'is'");
    e->args.push_back(std::move(operand));
    const token& t = cur();
    if (is_op("(")) {
      parse_call_args(*e);
    } else if ((t.type == tt::name || t.type == tt::string || t.type == tt::integer ||
                t.type == tt::floating || is_op("[") || is_op("{")) &&
               !(t.type == tt::name &&
                 (t.text == "else" || t.text == "or" || t.text == "and" || t.text == "if" ||
                  t.text == "in" || t.text == "not" || t.text == "is"))) {
      // `x is divisibleby 3`: one argument without parentheses
      nesting_guard guard(*this);
      e->args.push_back(parse_postfix(parse_primary()));
    }
    expr_ptr result = finish(std::move(e));
    if (negated) {
      auto n = node(ek::not_, line);
      n->args.push_back(std::move(result));
      result = finish(std::move(n));
    }
    return result;
  }

  std::vector<token> toks_;
  const lexer& lex_;
  std::size_t pos_ = 0;
  int nesting_ = 0;
  int loop_depth_ = 0;
  int open_line_ = 0;
  std::vector<std::string> names_seen_;  // varargs / kwargs mentions inside a macro body
};

// -- evaluator --------------------------------------------------------------------------------

struct scope {
  scope* parent = nullptr;
  std::vector<std::pair<std::string, value>> vars;

  const value* lookup(const std::string& name) const {
    for (const scope* s = this; s; s = s->parent)
      for (const auto& [k, v] : s->vars)
        if (k == name)
          return &v;
    return nullptr;
  }
  void set(const std::string& name, value v) {
    for (auto& [k, old] : vars)
      if (k == name) {
        old = std::move(v);
        return;
      }
    vars.emplace_back(name, std::move(v));
  }
};

enum class flow { normal, break_, continue_ };

struct call_args {
  std::vector<value> pos;
  std::vector<std::pair<std::string, value>> kw;

  const value* get(std::size_t idx, const char* name) const {
    for (const auto& [k, v] : kw)
      if (k == name)
        return &v;
    return idx < pos.size() ? &pos[idx] : nullptr;
  }
};

const char* builtin_names[] = {"range", "namespace", "raise_exception", "strftime_now", "dict"};

// Python's slice.indices(): the positions a slice selects.
std::vector<std::size_t> slice_indices(std::int64_t len, const value& start, const value& stop,
                                       const value& step) {
  auto as_opt = [](const value& v, const char* what) -> std::optional<std::int64_t> {
    if (v.kind == vk::none || v.is_undefined())
      return std::nullopt;
    if (!v.is_int_like())
      fail_plain(std::string("slice ") + what + " must be an integer");
    return v.as_int();
  };
  std::int64_t st = as_opt(step, "step").value_or(1);
  if (st == 0)
    fail_plain("slice step cannot be zero");
  auto a = as_opt(start, "start");
  auto b = as_opt(stop, "stop");
  std::int64_t lo, hi;
  auto clamp = [&](std::int64_t x, std::int64_t low, std::int64_t high) {
    if (x < 0)
      x += len;
    return std::clamp(x, low, high);
  };
  if (st > 0) {
    lo = a ? clamp(*a, 0, len) : 0;
    hi = b ? clamp(*b, 0, len) : len;
  } else {
    lo = a ? clamp(*a, -1, len - 1) : len - 1;
    hi = b ? clamp(*b, -1, len - 1) : -1;
  }
  std::vector<std::size_t> out;
  if (st > 0)
    for (std::int64_t k = lo; k < hi; k += st)
      out.push_back(static_cast<std::size_t>(k));
  else
    for (std::int64_t k = lo; k > hi; k += st)
      out.push_back(static_cast<std::size_t>(k));
  return out;
}

class renderer {
public:
  explicit renderer(scope& root) : root_(root) { current_steps = &steps_; }
  ~renderer() {
    current_steps = nullptr;
    // namespaces may reference each other (even themselves): empty them so that every
    // shared_ptr cycle is broken and nothing tears down recursively.
    for (auto& ns : namespaces_)
      ns->attrs.items.clear();
  }

  std::string out;

  void run(const body_t& body) { exec_body(body, root_); }

private:
  struct depth_guard {
    renderer& r;
    explicit depth_guard(renderer& rr) : r(rr) {
      if (++r.depth_ > max_eval_depth)
        r.fail("the template recursed too deeply");
    }
    ~depth_guard() { --r.depth_; }
  };

  [[noreturn]] void fail(const std::string& msg) const {
    fail_plain("chat template error at line " + std::to_string(line_) + ": " + msg);
  }
  void tick() {
    if (++steps_ > max_steps)
      fail("the template ran more than " + std::to_string(max_steps) + " steps");
  }
  void check_size(const std::string& s) const {
    if (s.size() > max_bytes)
      fail("string longer than " + std::to_string(max_bytes) + " bytes");
  }
  [[noreturn]] void fail_undefined(const value& v) const { fail(v.s); }

  // Runs f and prefixes any bare failure (from the value helpers) with the line.
  template <class F>
  auto located(F&& f) -> decltype(f()) {
    try {
      return f();
    } catch (template_failure& e) {
      if (!e.raised && e.message.rfind("chat template", 0) != 0)
        e.message = "chat template error at line " + std::to_string(line_) + ": " + e.message;
      throw;
    }
  }

  // ---- statements ----

  flow exec_body(const body_t& body, scope& sc) {
    depth_guard guard(*this);
    for (const auto& s : body) {
      flow f = exec(*s, sc);
      if (f != flow::normal)
        return f;
    }
    return flow::normal;
  }

  void emit(const value& v) {
    std::size_t before = out.size();
    located([&] {
      append_str(out, v);
      return 0;
    });
    check_size(out);
    charge((out.size() - before) / 16);
  }

  std::string capture(const body_t& body, scope& sc) {
    std::string saved;
    std::swap(saved, out);
    try {
      exec_body(body, sc);
    } catch (...) {
      std::swap(saved, out);
      throw;
    }
    std::swap(saved, out);
    return saved;
  }

  void assign(scope& sc, const std::vector<std::string>& targets, const value& v) {
    if (targets.size() == 1) {
      sc.set(targets[0], v);
      return;
    }
    std::vector<value> items = iterate(v);
    if (items.size() != targets.size())
      fail(std::string(items.size() < targets.size() ? "not enough" : "too many") +
           " values to unpack (expected " + std::to_string(targets.size()) + ", got " +
           std::to_string(items.size()) + ")");
    for (std::size_t k = 0; k < targets.size(); ++k)
      sc.set(targets[k], items[k]);
  }

  flow exec(const stmt& s, scope& sc) {
    tick();
    line_ = s.line;
    switch (s.kind) {
      case sk::data:
        out += s.text;
        check_size(out);
        charge(s.text.size() / 16);
        return flow::normal;
      case sk::output:
        emit(eval(*s.e, sc));
        return flow::normal;
      case sk::if_:
        for (std::size_t k = 0; k < s.conds.size(); ++k) {
          line_ = s.conds[k]->line;
          if (truthy(eval(*s.conds[k], sc)))
            return exec_body(s.bodies[k], sc);
        }
        return exec_body(s.else_body, sc);
      case sk::for_:
        return exec_for(s, sc);
      case sk::set:
        assign(sc, s.targets, eval(*s.e, sc));
        return flow::normal;
      case sk::set_ns: {
        const value* target = sc.lookup(s.targets[0]);
        if (!target || target->kind != vk::ns)
          fail("cannot assign attribute on non-namespace object '" + s.targets[0] + "'");
        value v = eval(*s.e, sc);
        as_ns(*target).attrs.set(s.attr, std::move(v));
        return flow::normal;
      }
      case sk::set_block: {
        value v = value::string(capture(s.body, sc));
        if (s.e)
          v = apply_chain(*s.e, std::move(v), sc);
        sc.set(s.targets[0], std::move(v));
        return flow::normal;
      }
      case sk::macro:
        sc.set(s.text, make_callable(callable_obj::type::macro, s.text, {}, &s));
        return flow::normal;
      case sk::break_:
        return flow::break_;
      case sk::continue_:
        return flow::continue_;
      case sk::filter_block: {
        value v = value::string(capture(s.body, sc));
        emit(apply_chain(*s.e, std::move(v), sc));
        return flow::normal;
      }
      case sk::with: {
        scope inner{&sc, {}};
        for (std::size_t k = 0; k < s.targets.size(); ++k)
          inner.set(s.targets[k], eval(*s.conds[k], sc));
        return exec_body(s.body, inner);
      }
      case sk::block:
        return exec_body(s.body, sc);
      case sk::call_block: {
        value caller = make_callable(callable_obj::type::caller, "caller", {}, &s);
        auto& c = static_cast<callable_obj&>(*caller.obj);
        c.block_scope = &sc;
        c.alive = std::make_shared<bool>(true);
        auto alive = c.alive;
        struct expire {
          std::shared_ptr<bool> a;
          ~expire() { *a = false; }
        } expire_caller{alive};
        const expr& ce = *s.e;
        value callee = eval(*ce.args[0], sc);
        call_args a = eval_args(ce, sc);
        a.kw.emplace_back("caller", std::move(caller));
        line_ = s.line;
        emit(call(callee, a, sc));
        return flow::normal;
      }
    }
    return flow::normal;
  }

  flow exec_for(const stmt& s, scope& sc) {
    value iterable = eval(*s.e, sc);
    std::vector<value> items = iterate(iterable);
    if (s.cond) {
      std::vector<value> kept;
      for (auto& item : items) {
        tick();
        scope filter_scope{&sc, {}};
        assign(filter_scope, s.targets, item);
        if (truthy(eval(*s.cond, filter_scope)))
          kept.push_back(std::move(item));
      }
      items = std::move(kept);
    }
    if (items.empty()) {
      scope inner{&sc, {}};
      exec_body(s.else_body, inner);
      return flow::normal;
    }
    value list = make_list(std::move(items));
    auto shared = std::static_pointer_cast<const list_obj>(list.obj);
    for (std::size_t k = 0; k < shared->items.size(); ++k) {
      tick();
      scope inner{&sc, {}};
      assign(inner, s.targets, shared->items[k]);
      auto lp = std::make_shared<loop_obj>();
      lp->items = shared;
      lp->index0 = k;
      lp->depth = shared->depth + 1;
      value loop_value;
      loop_value.kind = vk::loop;
      loop_value.obj = std::move(lp);
      inner.set("loop", std::move(loop_value));
      flow f = exec_body(s.body, inner);
      if (f == flow::break_)
        break;
    }
    return flow::normal;
  }

  // ---- iteration ----

  std::vector<value> iterate(const value& v) {
    switch (v.kind) {
      case vk::undefined:
        return {};
      case vk::list:
        return as_list(v).items;
      case vk::dict: {
        std::vector<value> keys;
        for (const auto& [k, item] : as_dict(v).items)
          keys.push_back(value::string(k));
        return keys;
      }
      case vk::string: {
        std::vector<value> chars;
        for (char32_t c : decode_utf8(v.s)) {
          std::string one;
          append_utf8(one, c);
          chars.push_back(value::string(std::move(one)));
        }
        return chars;
      }
      default:
        fail("'" + type_name(v) + "' object is not iterable");
    }
  }

  // ---- expressions ----

  value eval(const expr& e, scope& sc) {
    depth_guard guard(*this);
    tick();
    if (e.line)
      line_ = e.line;
    switch (e.kind) {
      case ek::literal:
        return e.lit;
      case ek::placeholder:
        return placeholder_;
      case ek::splat:
        fail("'*' is only allowed in call arguments");
      case ek::name: {
        if (const value* v = sc.lookup(e.name))
          return *v;
        for (const char* b : builtin_names)
          if (e.name == b)
            return make_callable(callable_obj::type::builtin, e.name);
        return value::undefined("'" + e.name + "' is undefined");
      }
      case ek::getattr: {
        value obj = eval(*e.args[0], sc);
        line_ = e.line;
        return get_attr(obj, e.name);
      }
      case ek::getitem: {
        value obj = eval(*e.args[0], sc);
        value key = eval(*e.args[1], sc);
        line_ = e.line;
        return get_item(obj, key);
      }
      case ek::slice: {
        value obj = eval(*e.args[0], sc);
        value parts[3];
        for (int k = 0; k < 3; ++k)
          if (e.args[k + 1])
            parts[k] = eval(*e.args[k + 1], sc);
        line_ = e.line;
        return located([&] { return slice(obj, parts[0], parts[1], parts[2]); });
      }
      case ek::call: {
        value callee = eval(*e.args[0], sc);
        call_args a = eval_args(e, sc);
        line_ = e.line;
        return call(callee, a, sc);
      }
      case ek::filter: {
        value operand = eval(*e.args[0], sc);
        call_args a = eval_args(e, sc);
        line_ = e.line;
        return located([&] { return apply_filter(e.name, operand, a, sc); });
      }
      case ek::test: {
        value operand = eval(*e.args[0], sc);
        call_args a = eval_args(e, sc);
        line_ = e.line;
        return value::boolean(located([&] { return apply_test(e.name, operand, a); }));
      }
      case ek::neg:
      case ek::pos: {
        value v = eval(*e.args[0], sc);
        line_ = e.line;
        if (v.is_undefined())
          fail_undefined(v);
        if (!v.is_number())
          fail("bad operand type for unary " + std::string(e.kind == ek::neg ? "-" : "+") + ": '" +
               type_name(v) + "'");
        if (e.kind == ek::pos)
          return v.kind == vk::boolean ? value::integer(v.as_int()) : v;
        if (v.kind == vk::floating)
          return value::floating(-v.f);
        if (v.as_int() == std::numeric_limits<std::int64_t>::min())
          fail("integer overflow");
        return value::integer(-v.as_int());
      }
      case ek::not_:
        return value::boolean(!truthy(eval(*e.args[0], sc)));
      case ek::and_: {
        value l = eval(*e.args[0], sc);
        return truthy(l) ? eval(*e.args[1], sc) : l;
      }
      case ek::or_: {
        value l = eval(*e.args[0], sc);
        return truthy(l) ? l : eval(*e.args[1], sc);
      }
      case ek::binop: {
        value l = eval(*e.args[0], sc);
        value r = eval(*e.args[1], sc);
        line_ = e.line;
        return located([&] { return binop(e.name, l, r); });
      }
      case ek::concat: {
        std::string s;
        for (const auto& a : e.args) {
          value v = eval(*a, sc);
          located([&] {
            append_str(s, v);
            return 0;
          });
        }
        return value::string(std::move(s));
      }
      case ek::compare: {
        value l = eval(*e.args[0], sc);
        for (std::size_t k = 0; k < e.ops.size(); ++k) {
          value r = eval(*e.args[k + 1], sc);
          line_ = e.line;
          bool ok = located([&] { return compare_op(e.ops[k], l, r); });
          if (!ok)
            return value::boolean(false);
          l = std::move(r);
        }
        return value::boolean(true);
      }
      case ek::cond: {
        if (truthy(eval(*e.args[1], sc)))
          return eval(*e.args[0], sc);
        if (e.args[2])
          return eval(*e.args[2], sc);
        return value::undefined("the inline if-expression on line " + std::to_string(e.line) +
                                " evaluated to false and no else section was defined.");
      }
      case ek::list:
      case ek::tuple: {
        std::vector<value> items;
        items.reserve(e.args.size());
        for (const auto& a : e.args)
          items.push_back(eval(*a, sc));
        return located([&] { return make_list(std::move(items), e.kind == ek::tuple); });
      }
      case ek::dict: {
        auto d = std::make_shared<dict_obj>();
        for (std::size_t k = 0; k + 1 < e.args.size(); k += 2) {
          value key = eval(*e.args[k], sc);
          value v = eval(*e.args[k + 1], sc);
          if (key.kind != vk::string)
            fail("only string keys are supported in dict literals");
          d->set(key.s, std::move(v));
        }
        return located([&] { return make_dict(std::move(d)); });
      }
    }
    return {};
  }

  call_args eval_args(const expr& e, scope& sc) {
    call_args a;
    for (std::size_t k = 1; k < e.args.size(); ++k) {
      if (e.args[k]->kind == ek::splat) {
        for (auto& v : iterate(eval(*e.args[k]->args[0], sc)))
          a.pos.push_back(std::move(v));
      } else {
        a.pos.push_back(eval(*e.args[k], sc));
      }
    }
    for (std::size_t k = 0; k < e.kwargs.size(); ++k) {
      value v = eval(*e.kwargs[k], sc);
      if (e.kwnames[k] == "**") {
        if (v.kind != vk::dict)
          fail("argument after ** must be a mapping, not " + type_name(v));
        for (const auto& [key, item] : as_dict(v).items)
          a.kw.emplace_back(key, item);
      } else {
        a.kw.emplace_back(e.kwnames[k], std::move(v));
      }
    }
    return a;
  }

  bool compare_op(const std::string& op, const value& l, const value& r) {
    if (op == "==")
      return equal(l, r);
    if (op == "!=")
      return !equal(l, r);
    if (op == "in")
      return contains(r, l);
    if (op == "not in")
      return !contains(r, l);
    int c = compare(l, r, op.c_str());
    if (op == "<")
      return c < 0;
    if (op == ">")
      return c > 0;
    if (op == "<=")
      return c <= 0;
    return c >= 0;
  }

  bool contains(const value& container, const value& item) {
    switch (container.kind) {
      case vk::string:
        if (item.kind != vk::string)
          fail("'in <string>' requires string as left operand, not " + type_name(item));
        return container.s.find(item.s) != std::string::npos;
      case vk::list:
        for (const auto& v : as_list(container).items)
          if (equal(v, item))
            return true;
        return false;
      case vk::dict:
        return item.kind == vk::string && as_dict(container).find(item.s);
      case vk::undefined:
        return false;
      default:
        fail("argument of type '" + type_name(container) + "' is not iterable");
    }
  }

  value binop(const std::string& op, const value& l, const value& r) {
    if (l.is_undefined())
      fail_undefined(l);
    if (r.is_undefined())
      fail_undefined(r);
    auto unsupported = [&]() -> value {
      fail("unsupported operand type(s) for " + op + ": '" + type_name(l) + "' and '" +
           type_name(r) + "'");
    };
    if (l.is_number() && r.is_number()) {
      bool fl = l.kind == vk::floating || r.kind == vk::floating;
      if (op == "/") {
        if (r.as_double() == 0)
          fail("division by zero");
        return value::floating(l.as_double() / r.as_double());
      }
      if (op == "**") {
        if (!fl && r.as_int() >= 0) {
          std::int64_t base = l.as_int(), result = 1;
          for (std::int64_t k = 0; k < r.as_int(); ++k) {
            if (__builtin_mul_overflow(result, base, &result))
              fail("integer overflow in '**'");
            if (result == 0 || result == 1)
              break;
          }
          if (result == 1 && base == -1 && (r.as_int() % 2))
            result = -1;
          return value::integer(result);
        }
        return value::floating(std::pow(l.as_double(), r.as_double()));
      }
      if (fl) {
        double a = l.as_double(), b = r.as_double();
        if (op == "+")
          return value::floating(a + b);
        if (op == "-")
          return value::floating(a - b);
        if (op == "*")
          return value::floating(a * b);
        if (b == 0)
          fail("float division by zero");
        double m = std::fmod(a, b);
        if (m != 0 && ((m < 0) != (b < 0)))
          m += b;
        if (op == "%")
          return value::floating(m);
        if (op == "//") {
          double div = (a - m) / b;
          double fd = std::floor(div);
          if (div - fd > 0.5)
            fd += 1.0;
          return value::floating(fd);
        }
        return unsupported();
      }
      std::int64_t a = l.as_int(), b = r.as_int(), res = 0;
      if (op == "+") {
        if (__builtin_add_overflow(a, b, &res))
          fail("integer overflow in '+'");
        return value::integer(res);
      }
      if (op == "-") {
        if (__builtin_sub_overflow(a, b, &res))
          fail("integer overflow in '-'");
        return value::integer(res);
      }
      if (op == "*") {
        if (__builtin_mul_overflow(a, b, &res))
          fail("integer overflow in '*'");
        return value::integer(res);
      }
      if (b == 0)
        fail("integer division or modulo by zero");
      if (a == std::numeric_limits<std::int64_t>::min() && b == -1)
        fail("integer overflow");
      std::int64_t q = a / b, m = a % b;
      if (m != 0 && ((m < 0) != (b < 0))) {
        m += b;
        --q;
      }
      if (op == "//")
        return value::integer(q);
      if (op == "%")
        return value::integer(m);
      return unsupported();
    }
    if (op == "+") {
      if (l.kind == vk::string && r.kind == vk::string) {
        if (l.s.size() + r.s.size() > max_bytes)
          fail("string too long");
        return value::string(l.s.str() + r.s.str());
      }
      if (l.kind == vk::list && r.kind == vk::list && as_list(l).tuple == as_list(r).tuple) {
        if (as_list(l).items.size() + as_list(r).items.size() > max_items)
          fail("list too long");
        std::vector<value> items = as_list(l).items;
        for (const auto& v : as_list(r).items)
          items.push_back(v);
        return make_list(std::move(items), as_list(l).tuple);
      }
      if (l.kind == vk::string)
        fail("can only concatenate str (not \"" + type_name(r) + "\") to str");
      if (l.kind == vk::list)
        fail("can only concatenate list (not \"" + type_name(r) + "\") to list");
      return unsupported();
    }
    if (op == "*") {
      const value* seq = l.is_int_like() ? &r : &l;
      const value* count = l.is_int_like() ? &l : &r;
      if (!count->is_int_like())
        return unsupported();
      std::int64_t n = std::max<std::int64_t>(0, count->as_int());
      if (seq->kind == vk::string) {
        if (n && seq->s.size() > max_bytes / static_cast<std::uint64_t>(n))
          fail("string too long");
        std::string s;
        for (std::int64_t k = 0; k < n; ++k)
          s += seq->s;
        return value::string(std::move(s));
      }
      if (seq->kind == vk::list) {
        const auto& src = as_list(*seq).items;
        if (n && src.size() > max_items / static_cast<std::uint64_t>(n))
          fail("list too long");
        std::vector<value> items;
        for (std::int64_t k = 0; k < n; ++k)
          items.insert(items.end(), src.begin(), src.end());
        return make_list(std::move(items), as_list(*seq).tuple);
      }
      return unsupported();
    }
    if (op == "%" && l.kind == vk::string)
      return value::string(percent_format(l.s, r));
    return unsupported();
  }

  // str % args with %s, %r, %d, %i, %f and %% (the forms templates use).
  std::string percent_format(const std::string& fmt, const value& args) {
    std::vector<value> list;
    if (args.kind == vk::list && as_list(args).tuple)
      list = as_list(args).items;
    else
      list.push_back(args);
    std::string out;
    std::size_t next = 0;
    for (std::size_t k = 0; k < fmt.size(); ++k) {
      if (fmt[k] != '%') {
        out.push_back(fmt[k]);
        continue;
      }
      if (++k >= fmt.size())
        fail("incomplete format");
      char c = fmt[k];
      if (c == '%') {
        out.push_back('%');
        continue;
      }
      if (next >= list.size())
        fail("not enough arguments for format string");
      const value& v = list[next++];
      if (c == 's')
        append_str(out, v);
      else if (c == 'r')
        append_repr(out, v);
      else if (c == 'd' || c == 'i') {
        if (!v.is_number())
          fail("%d format: a real number is required, not " + type_name(v));
        out += std::to_string(v.kind == vk::floating ? static_cast<std::int64_t>(v.f) : v.as_int());
      } else if (c == 'f') {
        if (!v.is_number())
          fail("must be real number, not " + type_name(v));
        char buf[64];
        std::snprintf(buf, sizeof buf, "%f", v.as_double());
        out += buf;
      } else {
        fail(std::string("unsupported format character '") + c + "'");
      }
      check_size(out);
    }
    if (next < list.size())
      fail("not all arguments converted during string formatting");
    return out;
  }

  // ---- attributes and items ----

  static bool is_str_method(const std::string& n) {
    static const char* names[] = {
        "startswith", "endswith",     "split",        "rsplit",  "strip",      "lstrip",
        "rstrip",     "upper",        "lower",        "title",   "capitalize", "replace",
        "find",       "rfind",        "index",        "count",   "join",       "format",
        "splitlines", "isdigit",      "isalpha",      "isalnum", "isspace",    "isupper",
        "islower",    "removeprefix", "removesuffix", "zfill",   "swapcase",   "partition",
        "rpartition", "casefold",     "center",       "ljust",   "rjust"};
    for (const char* m : names)
      if (n == m)
        return true;
    return false;
  }

  value get_attr(const value& obj, const std::string& name) {
    switch (obj.kind) {
      case vk::undefined:
        fail_undefined(obj);
      case vk::dict: {
        if (name == "items" || name == "keys" || name == "values" || name == "get")
          return located([&] { return make_callable(callable_obj::type::method, name, obj); });
        if (const value* v = as_dict(obj).find(name))
          return *v;
        break;
      }
      case vk::string:
        if (is_str_method(name))
          return located([&] { return make_callable(callable_obj::type::method, name, obj); });
        break;
      case vk::list:
        if (name == "index" || name == "count")
          return located([&] { return make_callable(callable_obj::type::method, name, obj); });
        if (name == "append" || name == "pop" || name == "extend" || name == "insert" ||
            name == "remove" || name == "sort" || name == "reverse" || name == "clear")
          fail("access to attribute '" + name + "' of 'list' object is unsafe");
        break;
      case vk::ns:
        if (const value* v = as_ns(obj).attrs.find(name))
          return *v;
        break;
      case vk::loop:
        return loop_attr(obj, name);
      default:
        break;
    }
    return value::undefined("'" + object_repr(obj) + "' has no attribute '" + name + "'");
  }

  value loop_attr(const value& obj, const std::string& name) {
    const auto& l = as_loop(obj);
    std::int64_t n = static_cast<std::int64_t>(l.items->items.size());
    std::int64_t i0 = static_cast<std::int64_t>(l.index0);
    if (name == "index0")
      return value::integer(i0);
    if (name == "index")
      return value::integer(i0 + 1);
    if (name == "revindex")
      return value::integer(n - i0);
    if (name == "revindex0")
      return value::integer(n - i0 - 1);
    if (name == "first")
      return value::boolean(i0 == 0);
    if (name == "last")
      return value::boolean(i0 == n - 1);
    if (name == "length")
      return value::integer(n);
    if (name == "depth")
      return value::integer(1);
    if (name == "depth0")
      return value::integer(0);
    if (name == "previtem")
      return i0 > 0 ? l.items->items[i0 - 1] : value::undefined("there is no previous item");
    if (name == "nextitem")
      return i0 + 1 < n ? l.items->items[i0 + 1] : value::undefined("there is no next item");
    if (name == "cycle")
      return located([&] { return make_callable(callable_obj::type::cycle, "cycle", obj); });
    return value::undefined("'LoopContext object' has no attribute '" + name + "'");
  }

  value get_item(const value& obj, const value& key) {
    if (obj.is_undefined())
      fail_undefined(obj);
    switch (obj.kind) {
      case vk::dict:
        if (key.kind == vk::string) {
          if (const value* v = as_dict(obj).find(key.s))
            return *v;
          return get_attr(obj, key.s);
        }
        break;
      case vk::list:
      case vk::string: {
        if (key.is_int_like()) {
          std::int64_t len =
              obj.kind == vk::list ? static_cast<std::int64_t>(as_list(obj).items.size()) : -1;
          std::u32string chars;
          if (obj.kind == vk::string) {
            chars = decode_utf8(obj.s);
            len = static_cast<std::int64_t>(chars.size());
          }
          std::int64_t k = key.as_int();
          if (k < 0)
            k += len;
          if (k >= 0 && k < len) {
            if (obj.kind == vk::list)
              return as_list(obj).items[k];
            std::string one;
            append_utf8(one, chars[k]);
            return value::string(std::move(one));
          }
          return value::undefined("'" + object_repr(obj) + "' has no element " +
                                  std::to_string(key.as_int()));
        }
        if (key.kind == vk::string)
          return get_attr(obj, key.s);
        break;
      }
      case vk::ns:
      case vk::loop:
        if (key.kind == vk::string)
          return get_attr(obj, key.s);
        break;
      default:
        break;
    }
    std::string k = key.kind == vk::string ? "'" + key.s.str() + "'" : to_str(key);
    return value::undefined("'" + object_repr(obj) + "' has no attribute " + k);
  }

  value slice(const value& obj, const value& a, const value& b, const value& c) {
    if (obj.is_undefined())
      fail_undefined(obj);
    if (obj.kind == vk::list) {
      const auto& items = as_list(obj).items;
      std::vector<value> out;
      for (std::size_t k : slice_indices(static_cast<std::int64_t>(items.size()), a, b, c))
        out.push_back(items[k]);
      return make_list(std::move(out), as_list(obj).tuple);
    }
    if (obj.kind == vk::string) {
      std::u32string chars = decode_utf8(obj.s);
      std::u32string out;
      for (std::size_t k : slice_indices(static_cast<std::int64_t>(chars.size()), a, b, c))
        out.push_back(chars[k]);
      return value::string(encode_utf8(out));
    }
    fail("'" + type_name(obj) + "' object is not subscriptable");
  }

  // ---- calls ----

  value call(const value& callee, const call_args& a, scope& sc) {
    if (callee.is_undefined())
      fail_undefined(callee);
    if (callee.kind != vk::callable)
      fail("'" + type_name(callee) + "' object is not callable");
    const auto& c = as_callable(callee);
    switch (c.t) {
      case callable_obj::type::builtin:
        return call_builtin(c.name, a);
      case callable_obj::type::method:
        return located([&] { return call_method(c.self, c.name, a); });
      case callable_obj::type::cycle: {
        if (a.pos.empty())
          fail("no items for cycling given");
        return a.pos[as_loop(c.self).index0 % a.pos.size()];
      }
      case callable_obj::type::macro:
        return call_macro(*c.macro, a, sc);
      case callable_obj::type::caller: {
        if (!c.alive || !*c.alive)
          fail("caller() called after its 'call' block ended");
        return call_macro(*c.macro, a, *c.block_scope, true);
      }
    }
    return {};
  }

  // A macro's body runs in a scope under the template's top level; a caller's body (a
  // {% call %} block) under the scope of its block.
  value call_macro(const stmt& m, const call_args& a, scope& block_scope, bool is_caller = false) {
    if (++macro_depth_ > max_macro_depth) {
      --macro_depth_;
      fail("macros nested more than " + std::to_string(max_macro_depth) + " calls deep");
    }
    struct undo {
      int& d;
      ~undo() { --d; }
    } undo_depth{macro_depth_};
    const std::string what = is_caller ? std::string("caller") : "macro '" + m.text + "'";
    if (a.pos.size() > m.targets.size() && !m.uses_varargs && !is_caller)
      fail(what + " takes not more than " + std::to_string(m.targets.size()) + " argument(s)");
    scope inner{is_caller ? &block_scope : &root_, {}};
    auto extra_kw = std::make_shared<dict_obj>();
    for (const auto& [k, v] : a.kw) {
      if (std::find(m.targets.begin(), m.targets.end(), k) != m.targets.end())
        continue;
      if (k == "caller" && !is_caller) {
        inner.set("caller", v);
      } else if (m.uses_kwargs) {
        extra_kw->set(k, v);
      } else {
        fail(what + " takes no keyword argument '" + k + "'");
      }
    }
    if (!is_caller) {
      std::vector<value> extra_pos;
      for (std::size_t k = m.targets.size(); k < a.pos.size(); ++k)
        extra_pos.push_back(a.pos[k]);
      inner.set("varargs", make_list(std::move(extra_pos)));
      inner.set("kwargs", make_dict(std::move(extra_kw)));
    }
    for (std::size_t k = 0; k < m.targets.size(); ++k) {
      const value* v = a.get(k, m.targets[k].c_str());
      if (v)
        inner.set(m.targets[k], *v);
      else if (m.defaults[k])
        inner.set(m.targets[k], eval(*m.defaults[k], inner));
      else
        inner.set(m.targets[k],
                  value::undefined("parameter '" + m.targets[k] + "' was not provided"));
    }
    int saved_line = line_;
    value result = value::string(capture(m.body, inner));
    line_ = saved_line;
    return result;
  }

  value call_builtin(const std::string& name, const call_args& a) {
    if (name == "raise_exception") {
      std::string msg = a.pos.empty() ? std::string() : to_str(a.pos[0]);
      throw template_failure{msg, true};
    }
    if (name == "namespace") {
      auto ns = std::make_shared<namespace_obj>();
      for (const auto& v : a.pos) {
        if (v.kind != vk::dict)
          fail("namespace() takes dicts and keyword arguments");
        for (const auto& [k, item] : as_dict(v).items)
          ns->attrs.set(k, item);
      }
      for (const auto& [k, v] : a.kw)
        ns->attrs.set(k, v);
      namespaces_.push_back(ns);
      value v;
      v.kind = vk::ns;
      v.obj = std::move(ns);
      return v;
    }
    if (name == "range") {
      std::int64_t args[3] = {0, 0, 1};
      if (a.pos.empty() || a.pos.size() > 3)
        fail("range expected 1 to 3 arguments");
      for (const auto& v : a.pos)
        if (!v.is_int_like())
          fail("'" + type_name(v) + "' object cannot be interpreted as an integer");
      if (a.pos.size() == 1)
        args[1] = a.pos[0].as_int();
      else {
        args[0] = a.pos[0].as_int();
        args[1] = a.pos[1].as_int();
        if (a.pos.size() == 3)
          args[2] = a.pos[2].as_int();
      }
      if (args[2] == 0)
        fail("range() arg 3 must not be zero");
      std::vector<value> items;
      for (std::int64_t k = args[0]; args[2] > 0 ? k < args[1] : k > args[1]; k += args[2]) {
        if (items.size() >= max_items)
          fail("range too large");
        items.push_back(value::integer(k));
        tick();
      }
      return make_list(std::move(items));
    }
    if (name == "strftime_now") {
      std::string fmt = a.pos.empty() ? std::string() : to_str(a.pos[0]);
      std::time_t now = std::time(nullptr);
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[512];
      std::size_t n = fmt.empty() ? 0 : std::strftime(buf, sizeof buf, fmt.c_str(), &tm);
      if (n == 0 && !fmt.empty())
        fail("strftime_now: the format gives too long or empty a result");
      return value::string(std::string(buf, n));
    }
    if (name == "dict") {
      auto d = std::make_shared<dict_obj>();
      for (const auto& v : a.pos) {
        if (v.kind != vk::dict)
          fail("dict() takes dicts and keyword arguments");
        for (const auto& [k, item] : as_dict(v).items)
          d->set(k, item);
      }
      for (const auto& [k, v] : a.kw)
        d->set(k, v);
      return make_dict(std::move(d));
    }
    fail("'" + name + "' is not callable");
  }

  std::string arg_str(const call_args& a, std::size_t idx, const char* name, const char* method) {
    const value* v = a.get(idx, name);
    if (!v)
      fail(std::string(method) + "() missing argument '" + name + "'");
    if (v->kind != vk::string)
      fail(std::string(method) + "() argument must be str, not " + type_name(*v));
    return v->s;
  }

  static std::u32string strip_chars(std::u32string s, const std::u32string* chars, bool left,
                                    bool right) {
    auto strip = [&](char32_t c) {
      return chars ? chars->find(c) != std::u32string::npos : py_space(c);
    };
    std::size_t b = 0, e = s.size();
    if (left)
      while (b < e && strip(s[b]))
        ++b;
    if (right)
      while (e > b && strip(s[e - 1]))
        --e;
    return s.substr(b, e - b);
  }

  value py_strip(const std::string& s, const value* chars, bool left, bool right) {
    if (chars && chars->kind != vk::none && chars->kind != vk::string)
      fail("strip arg must be None or str");
    bool have = chars && chars->kind == vk::string;
    if (!have || is_ascii(chars->s)) {
      // bytes suffice while the edges are ASCII; a non-ASCII edge may be a Unicode space
      auto strip_byte = [&](unsigned char c) {
        return have ? chars->s.find(static_cast<char>(c)) != std::string::npos : py_space(c);
      };
      std::size_t b = 0, e = s.size();
      if (left)
        while (b < e && static_cast<unsigned char>(s[b]) < 0x80 && strip_byte(s[b]))
          ++b;
      if (right)
        while (e > b && static_cast<unsigned char>(s[e - 1]) < 0x80 && strip_byte(s[e - 1]))
          --e;
      bool unicode_edge = (left && b < e && static_cast<unsigned char>(s[b]) >= 0x80) ||
                          (right && e > b && static_cast<unsigned char>(s[e - 1]) >= 0x80);
      if (have || !unicode_edge)
        return value::string(s.substr(b, e - b));
    }
    std::u32string set;
    if (have)
      set = decode_utf8(chars->s);
    return value::string(
        encode_utf8(strip_chars(decode_utf8(s), have ? &set : nullptr, left, right)));
  }

  std::vector<std::string> py_split(const std::string& s, const value* sep, std::int64_t max,
                                    bool from_right) {
    std::vector<std::string> parts;
    if (!sep || sep->kind == vk::none) {
      std::u32string u = decode_utf8(s);
      std::vector<std::u32string> words;
      if (!from_right) {
        std::size_t k = 0;
        while (true) {
          while (k < u.size() && py_space(u[k]))
            ++k;
          if (k >= u.size())
            break;
          if (max >= 0 && static_cast<std::int64_t>(words.size()) == max) {
            words.push_back(u.substr(k));  // Python keeps the remainder's trailing space
            break;
          }
          std::size_t st = k;
          while (k < u.size() && !py_space(u[k]))
            ++k;
          words.push_back(u.substr(st, k - st));
        }
      } else {
        std::size_t k = u.size();
        while (true) {
          while (k > 0 && py_space(u[k - 1]))
            --k;
          if (k == 0)
            break;
          if (max >= 0 && static_cast<std::int64_t>(words.size()) == max) {
            words.push_back(u.substr(0, k));
            break;
          }
          std::size_t e = k;
          while (k > 0 && !py_space(u[k - 1]))
            --k;
          words.push_back(u.substr(k, e - k));
        }
        std::reverse(words.begin(), words.end());
      }
      for (auto& w : words)
        parts.push_back(encode_utf8(w));
      return parts;
    }
    if (sep->kind != vk::string)
      fail("must be str or None, not " + type_name(*sep));
    const std::string& d = sep->s;
    if (d.empty())
      fail("empty separator");
    if (!from_right) {
      std::size_t start = 0;
      while (true) {
        std::size_t k = (max >= 0 && static_cast<std::int64_t>(parts.size()) == max)
                            ? std::string::npos
                            : s.find(d, start);
        if (k == std::string::npos) {
          parts.push_back(s.substr(start));
          break;
        }
        parts.push_back(s.substr(start, k - start));
        start = k + d.size();
      }
    } else {
      std::size_t end = s.size();
      while (true) {
        std::size_t k =
            (max >= 0 && static_cast<std::int64_t>(parts.size()) == max) || end < d.size()
                ? std::string::npos
                : s.rfind(d, end - d.size());
        if (k == std::string::npos) {
          parts.push_back(s.substr(0, end));
          break;
        }
        parts.push_back(s.substr(k + d.size(), end - k - d.size()));
        end = k;
      }
      std::reverse(parts.begin(), parts.end());
    }
    return parts;
  }

  static value str_list(std::vector<std::string> parts) {
    std::vector<value> items;
    items.reserve(parts.size());
    for (auto& p : parts)
      items.push_back(value::string(std::move(p)));
    return make_list(std::move(items));
  }

  std::int64_t int_arg(const call_args& a, std::size_t idx, const char* name,
                       std::int64_t fallback) {
    const value* v = a.get(idx, name);
    if (!v || v->kind == vk::none)
      return fallback;
    if (!v->is_int_like())
      fail(std::string("'") + name + "' must be an integer");
    return v->as_int();
  }

  static std::string py_title(const std::string& s) {
    std::u32string u = decode_utf8(s);
    bool prev_cased = false;
    for (char32_t& c : u) {
      bool alpha = is_alpha_cp(c);
      c = alpha ? (prev_cased ? to_lower_cp(c) : to_upper_cp(c)) : c;
      prev_cased = alpha;
    }
    return encode_utf8(u);
  }

  static std::string py_capitalize(const std::string& s) {
    std::u32string u = decode_utf8(s);
    for (std::size_t k = 0; k < u.size(); ++k)
      u[k] = k == 0 ? to_upper_cp(u[k]) : to_lower_cp(u[k]);
    return encode_utf8(u);
  }

  std::string py_replace(const std::string& s, const std::string& from, const std::string& to,
                         std::int64_t count) {
    std::string out;
    if (from.empty()) {
      // Python inserts `to` between every character (and at both ends)
      std::u32string u = decode_utf8(s);
      std::int64_t done = 0;
      for (std::size_t k = 0; k <= u.size(); ++k) {
        if (count < 0 || done < count) {
          out += to;
          ++done;
        }
        if (k < u.size())
          append_utf8(out, u[k]);
        check_size(out);
      }
      return out;
    }
    std::size_t start = 0;
    std::int64_t done = 0;
    while (count < 0 || done < count) {
      std::size_t k = s.find(from, start);
      if (k == std::string::npos)
        break;
      out.append(s, start, k - start);
      out += to;
      check_size(out);
      start = k + from.size();
      ++done;
    }
    out.append(s, start, std::string::npos);
    check_size(out);
    return out;
  }

  // str.format with {} / {0} / {name} fields (no format specs).
  std::string py_format(const std::string& fmt, const call_args& a) {
    std::string out;
    std::size_t auto_idx = 0;
    for (std::size_t k = 0; k < fmt.size(); ++k) {
      char c = fmt[k];
      if (c == '{' && k + 1 < fmt.size() && fmt[k + 1] == '{') {
        out.push_back('{');
        ++k;
      } else if (c == '}' && k + 1 < fmt.size() && fmt[k + 1] == '}') {
        out.push_back('}');
        ++k;
      } else if (c == '{') {
        std::size_t e = fmt.find('}', k);
        if (e == std::string::npos)
          fail("Single '{' encountered in format string");
        std::string field = fmt.substr(k + 1, e - k - 1);
        if (field.find_first_of(":!.[") != std::string::npos)
          fail("format specs in str.format are not supported");
        const value* v = nullptr;
        if (field.empty()) {
          if (auto_idx >= a.pos.size())
            fail("Replacement index out of range for positional args");
          v = &a.pos[auto_idx++];
        } else if (std::all_of(field.begin(), field.end(), [](char ch) {
                     return std::isdigit(static_cast<unsigned char>(ch));
                   })) {
          std::size_t idx = std::stoul(field);
          if (idx >= a.pos.size())
            fail("Replacement index out of range for positional args");
          v = &a.pos[idx];
        } else {
          for (const auto& [n, item] : a.kw)
            if (n == field)
              v = &item;
          if (!v)
            fail("KeyError: '" + field + "'");
        }
        append_str(out, *v);
        check_size(out);
        k = e;
      } else if (c == '}') {
        fail("Single '}' encountered in format string");
      } else {
        out.push_back(c);
      }
    }
    return out;
  }

  value call_method(const value& self, const std::string& name, const call_args& a) {
    if (self.kind == vk::dict) {
      const auto& d = as_dict(self);
      if (name == "items") {
        std::vector<value> items;
        for (const auto& [k, v] : d.items)
          items.push_back(make_list({value::string(k), v}, true));
        return make_list(std::move(items));
      }
      if (name == "keys") {
        std::vector<value> items;
        for (const auto& [k, v] : d.items)
          items.push_back(value::string(k));
        return make_list(std::move(items));
      }
      if (name == "values") {
        std::vector<value> items;
        for (const auto& [k, v] : d.items)
          items.push_back(v);
        return make_list(std::move(items));
      }
      if (name == "get") {
        if (a.pos.empty())
          fail("get expected at least 1 argument");
        if (a.pos[0].kind == vk::string)
          if (const value* v = d.find(a.pos[0].s))
            return *v;
        return a.pos.size() > 1 ? a.pos[1] : value::none();
      }
    }
    if (self.kind == vk::list) {
      const auto& items = as_list(self).items;
      if (a.pos.empty())
        fail(name + "() takes exactly one argument");
      std::int64_t count = 0;
      for (std::size_t k = 0; k < items.size(); ++k) {
        if (equal(items[k], a.pos[0])) {
          if (name == "index")
            return value::integer(static_cast<std::int64_t>(k));
          ++count;
        }
      }
      if (name == "index")
        fail(to_str(a.pos[0]) + " is not in list");
      return value::integer(count);
    }
    const std::string& s = self.s;
    if (name == "startswith" || name == "endswith") {
      const value* arg = a.get(0, "prefix");
      if (!arg)
        fail(name + "() takes at least 1 argument");
      std::vector<std::string> options;
      if (arg->kind == vk::string)
        options.push_back(arg->s);
      else if (arg->kind == vk::list && as_list(*arg).tuple) {
        for (const auto& v : as_list(*arg).items) {
          if (v.kind != vk::string)
            fail("tuple for " + name + " must only contain str");
          options.push_back(v.s);
        }
      } else {
        fail(name + " first arg must be str or a tuple of str, not " + type_name(*arg));
      }
      std::string_view view = s;
      if (a.pos.size() > 1) {
        std::u32string u = decode_utf8(s);
        std::int64_t len = static_cast<std::int64_t>(u.size());
        auto norm = [&](std::int64_t x) {
          return std::clamp(x < 0 ? x + len : x, std::int64_t{0}, len);
        };
        std::int64_t b = norm(int_arg(a, 1, "start", 0));
        std::int64_t e = a.pos.size() > 2 ? norm(int_arg(a, 2, "end", len)) : len;
        std::string sub = e > b ? encode_utf8(u.substr(b, e - b)) : std::string();
        for (const auto& o : options) {
          if (e - b < 0)
            continue;
          if (name == "startswith" ? sub.rfind(o, 0) == 0
                                   : (sub.size() >= o.size() &&
                                      sub.compare(sub.size() - o.size(), o.size(), o) == 0))
            return value::boolean(true);
        }
        return value::boolean(false);
      }
      for (const auto& o : options) {
        if (name == "startswith"
                ? view.substr(0, o.size()) == o
                : (view.size() >= o.size() && view.substr(view.size() - o.size()) == o))
          return value::boolean(true);
      }
      return value::boolean(false);
    }
    if (name == "split" || name == "rsplit")
      return str_list(
          py_split(s, a.get(0, "sep"), int_arg(a, 1, "maxsplit", -1), name == "rsplit"));
    if (name == "splitlines") {
      std::vector<std::string> lines;
      std::size_t start = 0;
      for (std::size_t k = 0; k < s.size(); ++k) {
        if (s[k] == '\n' || s[k] == '\r') {
          lines.push_back(s.substr(start, k - start));
          if (s[k] == '\r' && k + 1 < s.size() && s[k + 1] == '\n')
            ++k;
          start = k + 1;
        }
      }
      if (start < s.size())
        lines.push_back(s.substr(start));
      return str_list(std::move(lines));
    }
    if (name == "strip")
      return py_strip(s, a.get(0, "chars"), true, true);
    if (name == "lstrip")
      return py_strip(s, a.get(0, "chars"), true, false);
    if (name == "rstrip")
      return py_strip(s, a.get(0, "chars"), false, true);
    if (name == "upper")
      return value::string(map_case(s, true));
    if (name == "lower" || name == "casefold")
      return value::string(map_case(s, false));
    if (name == "title")
      return value::string(py_title(s));
    if (name == "capitalize")
      return value::string(py_capitalize(s));
    if (name == "swapcase") {
      std::u32string u = decode_utf8(s);
      for (char32_t& c : u)
        c = to_upper_cp(c) == c ? to_lower_cp(c) : to_upper_cp(c);
      return value::string(encode_utf8(u));
    }
    if (name == "replace")
      return value::string(py_replace(s, arg_str(a, 0, "old", "replace"),
                                      arg_str(a, 1, "new", "replace"), int_arg(a, 2, "count", -1)));
    if (name == "find" || name == "rfind" || name == "index" || name == "count") {
      std::string sub = arg_str(a, 0, "sub", name.c_str());
      if (name == "count") {
        if (sub.empty())
          return value::integer(static_cast<std::int64_t>(utf8_length(s)) + 1);
        std::int64_t n = 0;
        for (std::size_t k = s.find(sub); k != std::string::npos; k = s.find(sub, k + sub.size()))
          ++n;
        return value::integer(n);
      }
      std::size_t k = name == "rfind" ? s.rfind(sub) : s.find(sub);
      if (k == std::string::npos) {
        if (name == "index")
          fail("substring not found");
        return value::integer(-1);
      }
      return value::integer(
          static_cast<std::int64_t>(utf8_length(std::string_view(s).substr(0, k))));
    }
    if (name == "join") {
      if (a.pos.empty())
        fail("join() takes exactly one argument");
      std::string out;
      bool first = true;
      for (const auto& v : iterate(a.pos[0])) {
        if (v.kind != vk::string)
          fail("sequence item: expected str instance, " + type_name(v) + " found");
        if (!first)
          out += s;
        first = false;
        out += v.s;
        check_size(out);
      }
      return value::string(std::move(out));
    }
    if (name == "format")
      return value::string(py_format(s, a));
    if (name == "removeprefix") {
      std::string p = arg_str(a, 0, "prefix", "removeprefix");
      return value::string(s.rfind(p, 0) == 0 ? s.substr(p.size()) : s);
    }
    if (name == "removesuffix") {
      std::string p = arg_str(a, 0, "suffix", "removesuffix");
      bool ends =
          !p.empty() && s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
      return value::string(ends ? s.substr(0, s.size() - p.size()) : s);
    }
    if (name == "partition" || name == "rpartition") {
      std::string sep = arg_str(a, 0, "sep", name.c_str());
      if (sep.empty())
        fail("empty separator");
      std::size_t k = name == "partition" ? s.find(sep) : s.rfind(sep);
      std::vector<value> parts;
      if (k == std::string::npos) {
        if (name == "partition")
          parts = {value::string(s), value::string(""), value::string("")};
        else
          parts = {value::string(""), value::string(""), value::string(s)};
      } else {
        parts = {value::string(s.substr(0, k)), value::string(sep),
                 value::string(s.substr(k + sep.size()))};
      }
      return make_list(std::move(parts), true);
    }
    if (name == "zfill" || name == "center" || name == "ljust" || name == "rjust") {
      std::int64_t width = int_arg(a, 0, "width", 0);
      if (width > static_cast<std::int64_t>(max_bytes))
        fail("width too large");
      std::u32string u = decode_utf8(s);
      std::int64_t pad = width - static_cast<std::int64_t>(u.size());
      if (pad <= 0)
        return value::string(s);
      std::string fill = name == "zfill" ? "0" : " ";
      if (name != "zfill" && a.pos.size() > 1)
        fill = arg_str(a, 1, "fillchar", name.c_str());
      auto rep = [&](std::int64_t n) {
        std::string r;
        for (std::int64_t k = 0; k < n; ++k)
          r += fill;
        return r;
      };
      if (name == "ljust")
        return value::string(s + rep(pad));
      if (name == "rjust")
        return value::string(rep(pad) + s);
      if (name == "zfill") {
        if (!s.empty() && (s[0] == '-' || s[0] == '+'))
          return value::string(s.substr(0, 1) + rep(pad) + s.substr(1));
        return value::string(rep(pad) + s);
      }
      std::int64_t left = pad / 2 + (pad & width & 1);
      return value::string(rep(left) + s + rep(pad - left));
    }
    auto all_of = [&](auto pred) {
      std::u32string u = decode_utf8(s);
      return value::boolean(!u.empty() && std::all_of(u.begin(), u.end(), pred));
    };
    if (name == "isdigit")
      return all_of(is_digit_cp);
    if (name == "isalpha")
      return all_of(is_alpha_cp);
    if (name == "isalnum")
      return all_of([](char32_t c) { return is_alpha_cp(c) || is_digit_cp(c); });
    if (name == "isspace")
      return all_of(py_space);
    if (name == "isupper" || name == "islower") {
      std::u32string u = decode_utf8(s);
      bool cased = false;
      for (char32_t c : u) {
        bool up = to_lower_cp(c) != c, low = to_upper_cp(c) != c;
        if (name == "isupper" ? low : up)
          return value::boolean(false);
        cased = cased || up || low;
      }
      return value::boolean(cased);
    }
    fail("'" + type_name(self) + "' object has no method '" + name + "'");
  }

  // ---- filters ----

  value apply_chain(const expr& chain, value input, scope& sc) {
    value saved = std::move(placeholder_);
    placeholder_ = std::move(input);
    value out = eval(chain, sc);
    placeholder_ = std::move(saved);
    return out;
  }

  // jinja2's attribute lookup for filters: "a.b" and "0" parts.
  value attr_path(const value& v, const std::string& path) {
    value cur = v;
    std::size_t start = 0;
    while (true) {
      std::size_t dot = path.find('.', start);
      std::string part =
          path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      bool numeric = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) {
        return std::isdigit(static_cast<unsigned char>(c));
      });
      if (cur.is_undefined())
        return cur;
      cur = numeric ? get_item(cur, value::integer(std::stoll(part)))
                    : get_item(cur, value::string(part));
      if (dot == std::string::npos)
        return cur;
      start = dot + 1;
    }
  }

  bool test_by_name(const std::string& test, const value& v, const std::vector<value>& args) {
    call_args a;
    a.pos = args;
    return apply_test(test, v, a);
  }

  std::vector<value> select(const value& seq, const call_args& a, bool by_attr, bool keep) {
    std::vector<value> out;
    if (!truthy(seq))
      return out;  // jinja2 iterates only a truthy sequence
    std::size_t first_arg = 0;
    std::string attr;
    if (by_attr) {
      if (a.pos.empty() || a.pos[0].kind != vk::string)
        fail("selectattr/rejectattr need an attribute name");
      attr = a.pos[0].s;
      first_arg = 1;
    }
    std::string test;
    std::vector<value> test_args;
    if (a.pos.size() > first_arg) {
      if (a.pos[first_arg].kind != vk::string)
        fail("the test name must be a string");
      test = a.pos[first_arg].s;
      test_args.assign(a.pos.begin() + first_arg + 1, a.pos.end());
    }
    for (const auto& item : iterate(seq)) {
      tick();
      value subject = by_attr ? attr_path(item, attr) : item;
      bool ok = test.empty() ? truthy(subject) : test_by_name(test, subject, test_args);
      if (ok == keep)
        out.push_back(item);
    }
    return out;
  }

  // sort key comparison with jinja2's case_sensitive=False default
  value sort_key(const value& v, bool case_sensitive, const std::string& attr) {
    value k = attr.empty() ? v : attr_path(v, attr);
    if (!case_sensitive && k.kind == vk::string)
      return value::string(map_case(k.s, false));
    return k;
  }

  value apply_filter(const std::string& name, const value& v, const call_args& a, scope& sc) {
    tick();
    auto kw_bool = [&](std::size_t idx, const char* n, bool fallback) {
      const value* x = a.get(idx, n);
      return x ? truthy(*x) : fallback;
    };
    auto kw_str = [&](std::size_t idx, const char* n) {
      const value* x = a.get(idx, n);
      return x && !x->is_undefined() && x->kind != vk::none ? to_str(*x) : std::string();
    };
    if (name == "default" || name == "d") {
      const value* fallback = a.get(0, "default_value");
      bool boolean = kw_bool(1, "boolean", false);
      if (v.is_undefined() || (boolean && !truthy(v)))
        return fallback ? *fallback : value::string("");
      return v;
    }
    if (name == "safe" || name == "string" || name == "forceescape" || name == "e" ||
        name == "escape") {
      if (name == "safe")
        return v;
      std::string s = to_str(v);
      if (name == "string")
        return value::string(std::move(s));
      std::string out;
      for (char c : s) {
        switch (c) {
          case '&':
            out += "&amp;";
            break;
          case '<':
            out += "&lt;";
            break;
          case '>':
            out += "&gt;";
            break;
          case '"':
            out += "&#34;";
            break;
          case '\'':
            out += "&#39;";
            break;
          default:
            out.push_back(c);
        }
      }
      return value::string(std::move(out));
    }
    if (name == "tojson") {
      json_style st;
      if (const value* ind = a.get(0, "indent"); ind && ind->kind != vk::none) {
        st.indent = true;
        if (ind->kind == vk::string)
          st.indent_text = ind->s;
        else if (ind->is_int_like())
          st.indent_text = std::string(std::clamp<std::int64_t>(ind->as_int(), 0, 64), ' ');
        else
          fail("tojson: indent must be an integer or a string");
        st.item_sep = ",";
      }
      if (const value* sep = a.get(2, "separators"); sep && sep->kind == vk::list) {
        const auto& items = as_list(*sep).items;
        if (items.size() != 2 || items[0].kind != vk::string || items[1].kind != vk::string)
          fail("tojson: separators must be two strings");
        st.item_sep = items[0].s;
        st.key_sep = items[1].s;
      }
      st.sort_keys = kw_bool(3, "sort_keys", false);
      std::string out;
      append_json(out, v, st, 0);
      return value::string(std::move(out));
    }
    if (name == "length" || name == "count") {
      switch (v.kind) {
        case vk::undefined:
          return value::integer(0);
        case vk::string:
          return value::integer(static_cast<std::int64_t>(utf8_length(v.s)));
        case vk::list:
          return value::integer(static_cast<std::int64_t>(as_list(v).items.size()));
        case vk::dict:
          return value::integer(static_cast<std::int64_t>(as_dict(v).items.size()));
        default:
          fail("object of type '" + type_name(v) + "' has no len()");
      }
    }
    if (name == "trim")
      return py_strip(to_str(v), a.get(0, "chars"), true, true);
    if (name == "upper")
      return value::string(map_case(to_str(v), true));
    if (name == "lower")
      return value::string(map_case(to_str(v), false));
    if (name == "capitalize")
      return value::string(py_capitalize(to_str(v)));
    if (name == "title") {
      // jinja2's do_title: words start after whitespace, '-', '(', '{', '[' or '<'
      std::u32string u = decode_utf8(to_str(v));
      bool start = true;
      for (char32_t& c : u) {
        bool sep = py_space(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
        if (sep) {
          start = true;
          continue;
        }
        c = start ? to_upper_cp(c) : to_lower_cp(c);
        start = false;
      }
      return value::string(encode_utf8(u));
    }
    if (name == "replace") {
      if (a.pos.size() < 2)
        fail("replace needs two arguments");
      return value::string(
          py_replace(to_str(v), to_str(a.pos[0]), to_str(a.pos[1]), int_arg(a, 2, "count", -1)));
    }
    if (name == "int") {
      std::int64_t fallback = int_arg(a, 0, "default", 0);
      if (v.is_int_like())
        return value::integer(v.as_int());
      if (v.kind == vk::floating) {
        if (!std::isfinite(v.f) || std::fabs(v.f) > 9.2e18)
          return value::integer(fallback);
        return value::integer(static_cast<std::int64_t>(v.f));
      }
      if (v.kind == vk::string) {
        std::string s = encode_utf8(strip_chars(decode_utf8(v.s), nullptr, true, true));
        std::int64_t out = 0;
        auto res = std::from_chars(s.data() + (s.size() && s[0] == '+'), s.data() + s.size(), out);
        if (res.ec == std::errc{} && res.ptr == s.data() + s.size() && !s.empty())
          return value::integer(out);
        char* end = nullptr;
        double d = std::strtod(s.c_str(), &end);
        if (!s.empty() && end == s.c_str() + s.size() && std::isfinite(d) && std::fabs(d) < 9.2e18)
          return value::integer(static_cast<std::int64_t>(d));
      }
      return value::integer(fallback);
    }
    if (name == "float") {
      const value* fb = a.get(0, "default");
      double fallback = fb && fb->is_number() ? fb->as_double() : 0.0;
      if (v.is_number())
        return value::floating(v.as_double());
      if (v.kind == vk::string) {
        std::string s = encode_utf8(strip_chars(decode_utf8(v.s), nullptr, true, true));
        char* end = nullptr;
        double d = std::strtod(s.c_str(), &end);
        if (!s.empty() && end == s.c_str() + s.size())
          return value::floating(d);
      }
      return value::floating(fallback);
    }
    if (name == "abs") {
      if (v.kind == vk::floating)
        return value::floating(std::fabs(v.f));
      if (v.is_int_like()) {
        if (v.as_int() == std::numeric_limits<std::int64_t>::min())
          fail("integer overflow");
        return value::integer(std::llabs(v.as_int()));
      }
      fail("bad operand type for abs(): '" + type_name(v) + "'");
    }
    if (name == "round") {
      if (!v.is_number())
        fail("round: a number is required, not " + type_name(v));
      std::int64_t precision = int_arg(a, 0, "precision", 0);
      std::string method = a.get(1, "method") ? to_str(*a.get(1, "method")) : "common";
      if (method == "common" && v.is_int_like())
        return value::integer(v.as_int());  // Python's round() keeps an int an int
      double scale = std::pow(10.0, static_cast<double>(precision));
      double x = v.as_double() * scale;
      double r = method == "ceil"    ? std::ceil(x)
                 : method == "floor" ? std::floor(x)
                                     : std::nearbyint(x);
      if (method != "common" && method != "ceil" && method != "floor")
        fail("method must be common, ceil or floor");
      return value::floating(r / scale);
    }
    if (name == "join") {
      std::string sep = kw_str(0, "d");
      const value* attr = a.get(1, "attribute");
      std::string out;
      bool first = true;
      for (const auto& item : iterate(v)) {
        if (!first)
          out += sep;
        first = false;
        append_str(out, attr ? attr_path(item, to_str(*attr)) : item);
        check_size(out);
      }
      return value::string(std::move(out));
    }
    if (name == "first" || name == "last") {
      if (v.kind == vk::list) {
        const auto& items = as_list(v).items;
        if (items.empty())
          return value::undefined("No first item, sequence was empty.");
        return name == "first" ? items.front() : items.back();
      }
      std::vector<value> items = iterate(v);
      if (items.empty())
        return value::undefined("No first item, sequence was empty.");
      return name == "first" ? items.front() : items.back();
    }
    if (name == "list")
      return make_list(iterate(v));
    if (name == "items") {
      if (v.is_undefined())
        return make_list({});
      if (v.kind != vk::dict)
        fail("items: can only get item pairs from a mapping");
      return call_method(v, "items", {});
    }
    if (name == "reverse") {
      if (v.kind == vk::string) {
        std::u32string u = decode_utf8(v.s);
        std::reverse(u.begin(), u.end());
        return value::string(encode_utf8(u));
      }
      std::vector<value> items = iterate(v);
      std::reverse(items.begin(), items.end());
      return make_list(std::move(items));
    }
    if (name == "map") {
      if (!truthy(v))
        return make_list({});
      std::vector<value> out;
      const value* attr = nullptr;
      for (const auto& [k, x] : a.kw)
        if (k == "attribute")
          attr = &x;
      if (attr) {
        const value* fallback = nullptr;
        for (const auto& [k, x] : a.kw)
          if (k == "default")
            fallback = &x;
        for (const auto& item : iterate(v)) {
          tick();
          value r = attr_path(item, to_str(*attr));
          out.push_back(r.is_undefined() && fallback ? *fallback : r);
        }
        return make_list(std::move(out));
      }
      if (a.pos.empty() || a.pos[0].kind != vk::string)
        fail("map: a filter name or attribute= is required");
      call_args rest;
      rest.pos.assign(a.pos.begin() + 1, a.pos.end());
      rest.kw = a.kw;
      for (const auto& item : iterate(v))
        out.push_back(apply_filter(a.pos[0].s, item, rest, sc));
      return make_list(std::move(out));
    }
    if (name == "select")
      return make_list(select(v, a, false, true));
    if (name == "reject")
      return make_list(select(v, a, false, false));
    if (name == "selectattr")
      return make_list(select(v, a, true, true));
    if (name == "rejectattr")
      return make_list(select(v, a, true, false));
    if (name == "unique" || name == "sort" || name == "min" || name == "max") {
      bool case_sensitive = kw_bool(name == "sort" ? 1 : 0, "case_sensitive", false);
      std::string attr = kw_str(name == "sort" ? 2 : 1, "attribute");
      std::vector<value> items = iterate(v);
      if (name == "unique") {
        std::vector<value> out, keys;
        for (auto& item : items) {
          value k = sort_key(item, case_sensitive, attr);
          bool seen = false;
          for (const auto& s : keys)
            seen = seen || equal(s, k);
          if (!seen) {
            keys.push_back(std::move(k));
            out.push_back(std::move(item));
          }
          tick();
        }
        return make_list(std::move(out));
      }
      std::vector<std::pair<value, value>> keyed;
      for (auto& item : items)
        keyed.emplace_back(sort_key(item, case_sensitive, attr), std::move(item));
      std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
        return compare(x.first, y.first, "<") < 0;
      });
      if (name == "sort") {
        if (kw_bool(0, "reverse", false))
          std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
            return compare(x.first, y.first, "<") > 0;
          });
        std::vector<value> out;
        for (auto& kv : keyed)
          out.push_back(std::move(kv.second));
        return make_list(std::move(out));
      }
      if (keyed.empty())
        return value::undefined("No aggregated item, sequence was empty.");
      return name == "min" ? keyed.front().second : keyed.back().second;
    }
    if (name == "dictsort") {
      if (v.kind != vk::dict)
        fail("dictsort: a mapping is required");
      bool case_sensitive = kw_bool(0, "case_sensitive", false);
      std::string by = kw_str(1, "by");
      bool by_value = by == "value";
      bool rev = kw_bool(2, "reverse", false);
      std::vector<value> pairs;
      for (const auto& [k, x] : as_dict(v).items)
        pairs.push_back(make_list({value::string(k), x}, true));
      std::stable_sort(pairs.begin(), pairs.end(), [&](const value& x, const value& y) {
        value kx = sort_key(as_list(x).items[by_value ? 1 : 0], case_sensitive, "");
        value ky = sort_key(as_list(y).items[by_value ? 1 : 0], case_sensitive, "");
        int c = compare(kx, ky, "<");
        return rev ? c > 0 : c < 0;
      });
      return make_list(std::move(pairs));
    }
    if (name == "sum") {
      std::string attr = kw_str(0, "attribute");
      const value* start = a.get(1, "start");
      value total = start ? *start : value::integer(0);
      for (const auto& item : iterate(v))
        total = binop("+", total, attr.empty() ? item : attr_path(item, attr));
      return total;
    }
    if (name == "indent") {
      const value* w = a.get(0, "width");
      std::string pad =
          w && w->kind == vk::string
              ? w->s.str()
              : std::string(static_cast<std::size_t>(std::clamp<std::int64_t>(
                                w ? (w->is_int_like() ? w->as_int() : 4) : 4, 0, 256)),
                            ' ');
      bool first = kw_bool(1, "first", false);
      bool blank = kw_bool(2, "blank", false);
      std::string s = to_str(v) + "\n";
      std::vector<std::string> lines;
      std::size_t start = 0;
      for (std::size_t k = 0; k < s.size(); ++k)
        if (s[k] == '\n') {
          lines.push_back(s.substr(start, k - start));
          start = k + 1;
        }
      std::string out;
      if (blank) {
        for (std::size_t k = 0; k < lines.size(); ++k)
          out += (k ? "\n" + pad : "") + lines[k];
      } else {
        out = lines.empty() ? "" : lines[0];
        for (std::size_t k = 1; k < lines.size(); ++k)
          out += "\n" + (lines[k].empty() ? "" : pad) + lines[k];
      }
      if (first)
        out = pad + out;
      check_size(out);
      return value::string(std::move(out));
    }
    if (name == "attr") {
      if (a.pos.empty())
        fail("attr needs a name");
      return get_attr(v, to_str(a.pos[0]));
    }
    if (name == "format")
      return value::string(percent_format(to_str(v), make_list(a.pos, true)));
    if (name == "wordcount") {
      std::int64_t n = 0;
      bool in_word = false;
      for (char32_t c : decode_utf8(to_str(v))) {
        bool w = is_alpha_cp(c) || is_digit_cp(c) || c == '_';
        if (w && !in_word)
          ++n;
        in_word = w;
      }
      return value::integer(n);
    }
    if (name == "center") {
      call_args b;
      b.pos.push_back(value::integer(int_arg(a, 0, "width", 80)));
      return call_method(value::string(to_str(v)), "center", b);
    }
    fail("no filter named '" + name + "'");
  }

  // ---- tests ----

  bool apply_test(const std::string& name, const value& v, const call_args& a) {
    auto arg = [&]() -> const value& {
      if (a.pos.empty())
        fail("test '" + name + "' needs an argument");
      return a.pos[0];
    };
    if (name == "defined")
      return !v.is_undefined();
    if (name == "undefined")
      return v.is_undefined();
    if (name == "none")
      return v.kind == vk::none;
    if (name == "boolean")
      return v.kind == vk::boolean;
    if (name == "true")
      return v.kind == vk::boolean && v.b;
    if (name == "false")
      return v.kind == vk::boolean && !v.b;
    if (name == "integer")
      return v.kind == vk::integer;
    if (name == "float")
      return v.kind == vk::floating;
    if (name == "number")
      return v.is_number();
    if (name == "string")
      return v.kind == vk::string;
    if (name == "mapping")
      return v.kind == vk::dict;
    if (name == "iterable")
      return v.kind == vk::list || v.kind == vk::dict || v.kind == vk::string || v.is_undefined();
    if (name == "sequence")
      return v.kind == vk::list || v.kind == vk::dict || v.kind == vk::string || v.is_undefined();
    if (name == "callable")
      return v.kind == vk::callable;
    if (name == "sameas") {
      const value& o = arg();
      if (v.obj || o.obj)
        return v.obj == o.obj && v.kind == o.kind;
      return v.kind == o.kind && (v.kind == vk::none || v.kind == vk::undefined ||
                                  (v.kind == vk::boolean && v.b == o.b));
    }
    if (name == "escaped")
      return false;
    if (name == "eq" || name == "equalto" || name == "==")
      return equal(v, arg());
    if (name == "ne" || name == "!=")
      return !equal(v, arg());
    if (name == "lt" || name == "lessthan" || name == "<")
      return compare(v, arg(), "<") < 0;
    if (name == "le" || name == "<=")
      return compare(v, arg(), "<=") <= 0;
    if (name == "gt" || name == "greaterthan" || name == ">")
      return compare(v, arg(), ">") > 0;
    if (name == "ge" || name == ">=")
      return compare(v, arg(), ">=") >= 0;
    if (name == "in")
      return contains(arg(), v);
    if (name == "odd" || name == "even" || name == "divisibleby") {
      // jinja2: value % 2 == 1, value % 2 == 0, value % num == 0 (floats too)
      value divisor = name == "divisibleby" ? arg() : value::integer(2);
      value rest = binop("%", v, divisor);
      return equal(rest, value::integer(name == "odd" ? 1 : 0));
    }
    if (name == "lower" || name == "upper") {
      std::string s = to_str(v);
      return s == map_case(s, name == "upper");
    }
    if (name == "filter" || name == "test")
      return false;
    fail("no test named '" + name + "'");
  }

  scope& root_;
  value placeholder_;
  std::uint64_t steps_ = 0;
  int depth_ = 0;
  int macro_depth_ = 0;
  int line_ = 0;
  std::vector<std::shared_ptr<namespace_obj>> namespaces_;
};

// -- data in ----------------------------------------------------------------------------------

template <class J>
value from_json(const J& j, int depth) {
  if (depth > static_cast<int>(max_value_depth))
    fail_plain("chat template input nested deeper than " + std::to_string(max_value_depth) +
               " levels");
  switch (j.type()) {
    case nlohmann::json::value_t::null:
      return value::none();
    case nlohmann::json::value_t::boolean:
      return value::boolean(j.template get<bool>());
    case nlohmann::json::value_t::number_integer:
      return value::integer(j.template get<std::int64_t>());
    case nlohmann::json::value_t::number_unsigned: {
      auto u = j.template get<std::uint64_t>();
      if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        return value::floating(static_cast<double>(u));
      return value::integer(static_cast<std::int64_t>(u));
    }
    case nlohmann::json::value_t::number_float:
      return value::floating(j.template get<double>());
    case nlohmann::json::value_t::string:
      return value::string(j.template get<std::string>());
    case nlohmann::json::value_t::array: {
      std::vector<value> items;
      items.reserve(j.size());
      for (const auto& x : j)
        items.push_back(from_json(x, depth + 1));
      return make_list(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      auto d = std::make_shared<dict_obj>();
      for (auto it = j.begin(); it != j.end(); ++it)
        d->set(it.key(), from_json(it.value(), depth + 1));
      return make_dict(std::move(d));
    }
    default:
      return value::undefined("unsupported JSON value");
  }
}

// The special tokens of tokenizer_config.json may be {"content": "..."} objects (AddedToken);
// transformers hands the template their text, and leaves unset (null) tokens out.
template <class J>
void add_variable(scope& root, const std::string& key, const J& j) {
  bool token_key = key.size() > 6 && key.compare(key.size() - 6, 6, "_token") == 0;
  if (token_key) {
    if (j.is_null())
      return;
    if (j.is_object() && j.contains("content") && j["content"].is_string()) {
      root.set(key, value::string(j["content"].template get<std::string>()));
      return;
    }
  }
  if (key == "additional_special_tokens" && j.is_array()) {
    std::vector<value> items;
    for (const auto& x : j) {
      if (x.is_object() && x.contains("content") && x["content"].is_string())
        items.push_back(value::string(x["content"].template get<std::string>()));
      else
        items.push_back(from_json(x, 1));
    }
    root.set(key, make_list(std::move(items)));
    return;
  }
  root.set(key, from_json(j, 0));
}

template <class J>
result<std::string> render_impl(const chat_template::program& prog, const J& messages,
                                bool add_generation_prompt, const J& extra) {
  try {
    scope root;
    // transformers passes tools and documents even when there are none
    root.set("tools", value::none());
    root.set("documents", value::none());
    if (extra.is_object())
      for (auto it = extra.begin(); it != extra.end(); ++it)
        add_variable(root, it.key(), it.value());
    root.set("messages", from_json(messages, 0));
    root.set("add_generation_prompt", value::boolean(add_generation_prompt));
    renderer r(root);
    r.run(prog.body);
    return std::move(r.out);
  } catch (const template_failure& f) {
    if (f.raised)
      return make_error(error_code::invalid_argument, f.message);
    if (f.message.rfind("chat template", 0) == 0)
      return make_error(error_code::invalid_config, f.message);
    return make_error(error_code::invalid_config, "chat template error: " + f.message);
  } catch (const std::bad_alloc&) {
    return make_error(error_code::invalid_config, "chat template: out of memory while rendering");
  } catch (const std::exception& e) {
    return make_error(error_code::invalid_config, std::string("chat template: ") + e.what());
  }
}

const char* chatml_source =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}";

}  // namespace

// -- public API -------------------------------------------------------------------------------

result<chat_template> chat_template::parse(const std::string& source) {
  try {
    lexer lex(source);
    parser p(lex.run(), lex);
    auto prog = std::make_shared<program>();
    prog->body = p.parse_template();
    return chat_template(std::shared_ptr<const program>(std::move(prog)));
  } catch (const template_failure& f) {
    return make_error(error_code::invalid_config, f.message);
  } catch (const std::bad_alloc&) {
    return make_error(error_code::invalid_config, "chat template: out of memory while parsing");
  } catch (const std::exception& e) {
    return make_error(error_code::invalid_config, std::string("chat template: ") + e.what());
  }
}

chat_template chat_template::chatml() {
  static const std::shared_ptr<const program> prog = [] {
    auto parsed = parse(chatml_source);
    assert(parsed.ok());
    return parsed->program_;
  }();
  return chat_template(prog);
}

result<std::string> chat_template::render(const nlohmann::json& messages,
                                          bool add_generation_prompt,
                                          const nlohmann::json& extra) const {
  return render_impl(*program_, messages, add_generation_prompt, extra);
}

result<std::string> chat_template::render(const nlohmann::ordered_json& messages,
                                          bool add_generation_prompt,
                                          const nlohmann::ordered_json& extra) const {
  return render_impl(*program_, messages, add_generation_prompt, extra);
}

chat_template::chat_template(std::shared_ptr<const program> parsed) : program_(std::move(parsed)) {}
chat_template::chat_template(const chat_template&) = default;
chat_template& chat_template::operator=(const chat_template&) = default;
chat_template::chat_template(chat_template&&) noexcept = default;
chat_template& chat_template::operator=(chat_template&&) noexcept = default;
chat_template::~chat_template() = default;

}  // namespace moert::tokenizer
