#pragma once

// Chat templates as transformers renders them: an interpreter of the Jinja subset that real
// `tokenizer_config.json` templates use, with transformers' settings (jinja2 3.1,
// ImmutableSandboxedEnvironment, trim_blocks and lstrip_blocks on, loopcontrols, its own
// tojson = json.dumps(ensure_ascii=False), raise_exception, strftime_now, {% generation %}).
// ChatML is the fallback template.
//
// Supported: {{ }} {% %} {# #} with `-`/`+` whitespace control, raw; if/elif/else; for (tuple
// targets, `if` filter, else, loop.index/index0/revindex/revindex0/first/last/length/
// previtem/nextitem/cycle, break/continue); set (tuples, `ns.attr`, block set with filters)
// with jinja2's scoping (a loop body is its own scope); namespace(); macro (defaults,
// varargs/kwargs, caller) and call blocks; filter blocks; with. Expressions: Python literals
// and string escapes, + - * / // % ** ~, chained comparisons, and/or/not, in/not in,
// a if c else b, calls with *args/**kwargs, subscripts, slices, attributes (dicts too).
// Tests, filters and str/dict/list methods: the common jinja2/Python ones (see the .cpp).
// Undefined follows jinja2's default Undefined (prints "", false, fails when used further).
// Not supported: include/import/extends/block (no loader), recursive loops, loop.changed,
// groupby/batch/slice/truncate/wordwrap/urlize and a few other filters, str.format specs,
// non-string dict keys, integers beyond 64 bits (an error, where Python has bigints).
//
// Limits (a template is untrusted input): nesting depth, evaluation steps, output and string
// size, list length and value depth are bounded; hitting one is an error, never a crash.
//
// Thread safety: a parsed template is immutable; render() may run on any thread at once.

#include "core/error.hpp"

#include <nlohmann/json.hpp>

#include <memory>
#include <string>

namespace moert::tokenizer {

class chat_template {
public:
  // Parses the template source; a syntax error (error_code::invalid_config) names the line,
  // the column and what was expected.
  static result<chat_template> parse(const std::string& source);
  // The ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`).
  static chat_template chatml();

  // `messages` is the OpenAI-style array; `extra` adds variables (bos_token, eos_token, tools,
  // …). As transformers does, `tools` and `documents` are none unless `extra` sets them, a
  // `*_token` given as an AddedToken object ({"content": …}) is passed as its text, and a null
  // `*_token` is left undefined.
  // Errors: `raise_exception(msg)` in the template gives error_code::invalid_argument whose
  // message is exactly msg; any other failure (a runtime type error, an undefined value used,
  // a size or step limit) gives error_code::invalid_config naming the template line.
  result<std::string> render(const nlohmann::json& messages, bool add_generation_prompt,
                             const nlohmann::json& extra = nlohmann::json::object()) const;
  // The same with insertion-ordered objects: `tojson` and `.items()` then keep the keys in
  // the order the request gave them (Python dicts do; nlohmann::json sorts them).
  result<std::string> render(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                             const nlohmann::ordered_json& extra) const;

  chat_template(const chat_template&);
  chat_template& operator=(const chat_template&);
  chat_template(chat_template&&) noexcept;
  chat_template& operator=(chat_template&&) noexcept;
  ~chat_template();
  struct program;

private:
  explicit chat_template(std::shared_ptr<const program> parsed);
  std::shared_ptr<const program> program_;
};

}  // namespace moert::tokenizer
