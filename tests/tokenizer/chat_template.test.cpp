// The chat-template interpreter against jinja2 3.1 as transformers configures it
// (trim_blocks, lstrip_blocks, loopcontrols, its tojson). Every expected string in the
// "jinja:" cases was rendered by jinja2 3.1.6 with the same variables; the fixture cases come
// from transformers' apply_chat_template (../shared/fixtures/tokenizers/*/cases.json).

#include <catch2/catch.hpp>

#include "test_support.hpp"
#include "tokenizer/chat_template.hpp"

#include <atomic>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

using moert::error_code;
using moert::tokenizer::chat_template;
using ojson = nlohmann::ordered_json;

namespace {

// The variables every "jinja:" case renders with (key order matters: Python dicts keep it).
const ojson& variables() {
  static const ojson vars = ojson::parse(R"({
    "xs": [1, 2, 3], "d": {"b": 1, "a": 2}, "s": "h\u00e9llo", "n": null,
    "msgs": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "x": 1}],
    "t": "  a b  ", "e": "", "num": 7, "f": 2.5})");
  return vars;
}

moert::result<std::string> try_render(const std::string& source,
                                      const ojson& messages = ojson::array(),
                                      bool add_generation_prompt = false,
                                      const ojson& extra = variables()) {
  auto parsed = chat_template::parse(source);
  if (!parsed.ok())
    return parsed.err();
  return parsed->render(messages, add_generation_prompt, extra);
}

std::string render(const std::string& source) {
  auto out = try_render(source);
  INFO("template: " << source);
  if (!out.ok())
    FAIL("render failed: " << out.err().message);
  return out.ok() ? *out : std::string();
}

std::string error_of(const std::string& source, const ojson& extra = variables()) {
  auto out = try_render(source, ojson::array(), false, extra);
  INFO("template: " << source);
  REQUIRE_FALSE(out.ok());
  return out.err().message;
}

std::string syntax_error_of(const std::string& source) {
  auto parsed = chat_template::parse(source);
  INFO("template: " << source);
  REQUIRE_FALSE(parsed.ok());
  CHECK(parsed.err().code == error_code::invalid_config);
  return parsed.err().message;
}

std::filesystem::path tokenizer_fixture(const std::string& name) {
  auto dir = std::filesystem::path{MOERT_FIXTURES_DIR} / "tokenizers" / name;
  return std::filesystem::exists(dir / "cases.json") ? dir : std::filesystem::path{};
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// What transformers hands the template besides messages: the special tokens of
// tokenizer_config.json as they are written there (strings or AddedToken objects).
ojson special_tokens(const ojson& config) {
  ojson extra = ojson::object();
  for (const char* key :
       {"bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens"})
    if (config.contains(key))
      extra[key] = config[key];
  return extra;
}

struct fixture_template {
  chat_template tpl;
  ojson extra;
  ojson cases;
};

std::optional<fixture_template> load_fixture(const std::string& name) {
  auto dir = tokenizer_fixture(name);
  if (dir.empty()) {
    moert::test::skip_whole_binary("../shared/fixtures/tokenizers/" + name + " not found");
    return std::nullopt;
  }
  auto config = ojson::parse(read_file(dir / "tokenizer_config.json"));
  std::string source = config.contains("chat_template") ? config["chat_template"].get<std::string>()
                                                        : read_file(dir / "chat_template.jinja");
  auto parsed = chat_template::parse(source);
  REQUIRE(parsed.ok());
  return fixture_template{*parsed, special_tokens(config),
                          ojson::parse(read_file(dir / "cases.json"))};
}

}  // namespace

TEST_CASE("every chat case of the fixture tokenizers renders as transformers renders it") {
  for (const char* name : {"qwen3", "deepseek_v3", "mistral"}) {
    auto fx = load_fixture(name);
    if (!fx)
      return;
    REQUIRE(fx->cases["chat"].size() >= 3);
    for (const auto& c : fx->cases["chat"]) {
      INFO(name << ": " << c["note"].get<std::string>());
      auto out = fx->tpl.render(c["messages"], c["add_generation_prompt"].get<bool>(), fx->extra);
      if (c.contains("error")) {
        REQUIRE_FALSE(out.ok());
        CHECK(out.err().code == error_code::invalid_argument);
        CHECK(out.err().message == c["error"].get<std::string>());
      } else {
        REQUIRE(out.ok());
        CHECK(*out == c["text"].get<std::string>());
      }
    }
  }
}

TEST_CASE("the same cases through the nlohmann::json overload (sorted keys)") {
  auto fx = load_fixture("deepseek_v3");
  if (!fx)
    return;
  const auto& c = fx->cases["chat"][0];
  auto out = fx->tpl.render(nlohmann::json::parse(c["messages"].dump()),
                            c["add_generation_prompt"].get<bool>(),
                            nlohmann::json::parse(fx->extra.dump()));
  REQUIRE(out.ok());
  CHECK(*out == c["text"].get<std::string>());
}

TEST_CASE("jinja: if, elif and else") {
  CHECK(render("{% if xs %}yes{% elif d %}no{% else %}never{% endif %}{% if e %}a{% elif n %}b{% "
               "else %}c{% endif %}{% if e %}a{% elif xs %}b{% endif %}") == "yescb");
  CHECK(render("{% if num > 5 and num < 10 %}mid{% endif %}{% if not e %}empty{% endif %}{% if n "
               "is none or e %}x{% endif %}") == "midemptyx");
  CHECK(render("{% if undefined_q %}a{% else %}b{% endif %}") == "b");
}

TEST_CASE("jinja: for loops and the loop variable") {
  CHECK(render("{% for x in xs %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last "
               "}}{{ loop.previtem }}{{ loop.nextitem }}{{ loop.cycle('a', 'b') }},{% endfor %}") ==
        "10TrueFalse2a,21FalseFalse13b,32FalseTrue2a,");
  CHECK(render("{% for k, v in d.items() %}{{ k }}={{ v }}{{ loop.revindex }}{{ loop.revindex0 "
               "}}{{ loop.length }}{% endfor %}") == "b=1212a=2102");
  CHECK(render("{% for x in xs if x > 1 %}{{ x }}:{{ loop.index }}/{{ loop.length }} {% else "
               "%}empty{% endfor %}") == "2:1/2 3:2/2 ");
  CHECK(render("{% for x in [] %}{{ x }}{% else %}empty{% endfor %}{% for x in undefined_q %}{{ x "
               "}}{% else %}none{% endfor %}") == "emptynone");
  CHECK(render("{% for x in xs %}{% if x == 2 %}{% continue %}{% endif %}{{ x }}{% if x == 3 %}{% "
               "break %}{% endif %}{% endfor %}") == "13");
  CHECK(render("{% for a, b in [[1, 2], [3, 4]] %}{{ a }}{{ b }}{% endfor %}{% for k in d %}{{ k "
               "}}{% endfor %}{% for c in 'hé' %}[{{ c }}]{% endfor %}") == "1234ba[h][é]");
  CHECK(render("{% for m in msgs[::-1] %}{{ loop.index0 }}{{ m.role }} {% endfor %}") ==
        "0assistant 1user ");
  CHECK(render("{% for x in xs %}{% for y in xs %}{{ loop.index }}{% endfor %}/{{ loop.index }} {% "
               "endfor %}") == "123/1 123/2 123/3 ");
  CHECK(render("{% for i in range(3) %}{{ i }}{% endfor %}{% for i in range(1, 7, 2) %}{{ i }}{% "
               "endfor %}{% for i in range(3, 0, -1) %}{{ i }}{% endfor %}") == "012135321");
}

TEST_CASE("jinja: set, scoping and namespace") {
  CHECK(render("{% set x = 1 %}{% for i in [1,2] %}{{ x }}{% set x = i*10 %}{{ x }};{% endfor %}{{ "
               "x }}") == "110;120;1");
  CHECK(render("{% for i in [1,2] %}{{ x }}{% set x = i*10 %}{{ x }};{% endfor %}[{{ x }}]") ==
        "10;20;[]");
  CHECK(render("{% set ns = namespace(a=1, b='x') %}{% for x in xs %}{% set ns.a = ns.a + x %}{% "
               "endfor %}{{ ns.a }}{{ ns.b }}") == "7x");
  CHECK(render("{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set c = (3, 4) %}{{ c }}") == "12(3, 4)");
  CHECK(render("{% set blk %}inner {{ 1 + 1 }}{% endset %}[{{ blk }}]") == "[inner 2]");
  CHECK(render("{% set blk | upper %}inner {{ 1 + 1 }}{% endset %}[{{ blk }}]") == "[INNER 2]");
  CHECK(render("{% if true %}{% set inif = 3 %}{% endif %}{{ inif }}") == "3");
  CHECK(render("{% for m in msgs %}{% set role = m.role %}{{ role }}{% endfor %}[{{ role }}]") ==
        "userassistant[]");
  CHECK(render("{% with a = 5, b = 6 %}{{ a + b }}{% endwith %}[{{ a }}]") == "11[]");
  CHECK(render("{% set ns = namespace() %}{% set ns.items = [] %}{{ ns.items|length }}") == "0");
  CHECK(render("{% filter upper %}hello {{ s }}{% endfilter %}") == "HELLO HÉLLO");
}

TEST_CASE("jinja: macros and call blocks") {
  CHECK(render("{% macro f(a, b=2) %}{{ a }}-{{ b }}{% endmacro %}{{ f(1) }}{{ f(1, b=3) }}{{ "
               "f('x', 'y') }}") == "1-21-3x-y");
  CHECK(render("{% macro greet(name) %}Hi {{ name }}{% endmacro %}{% for m in msgs %}{{ "
               "greet(m.role) }};{% endfor %}") == "Hi user;Hi assistant;");
  CHECK(render("{% macro wrap(tag) %}<{{ tag }}>{{ caller() }}</{{ tag }}>{% endmacro %}{% call "
               "wrap('b') %}bold {{ s }}{% endcall %}") == "<b>bold héllo</b>");
  CHECK(render("{% macro each(items) %}{% for i in items %}{{ caller(i) }}{% endfor %}{% endmacro "
               "%}{% call(x) each(xs) %}[{{ x * 2 }}]{% endcall %}") == "[2][4][6]");
  CHECK(
      render(
          "{% macro v() %}{{ varargs|length }}{{ kwargs.k }}{% endmacro %}{{ v(1, 2, k='w') }}") ==
      "2w");
  CHECK(render("{% macro add(a, b) %}{{ a + b }}{% endmacro %}{{ add(*[1, 2]) }}{{ add(**{'a': 3, "
               "'b': 4}) }}") == "37");
  CHECK(render("{% macro fact(n) %}{% if n <= 1 %}1{% else %}{{ n * fact(n - 1)|int }}{% endif "
               "%}{% endmacro %}{{ fact(5) }}") == "120");
}

TEST_CASE("jinja: literals, arithmetic and logic") {
  CHECK(render("{{ [1, 'a', none, true, 1.5, {'k': 'v'}] }} {{ (1,) }} {{ () }} {{ True }} {{ None "
               "}} {{ 1_000 }}") == "[1, 'a', None, True, 1.5, {'k': 'v'}] (1,) () True None 1000");
  CHECK(
      render("{{ 1/3 }} {{ 10/2 }} {{ 1e16 }} {{ 1e15 }} {{ 0.0001 }} {{ 0.00001 }} {{ -7//2 }} {{ "
             "-7 % 3 }} {{ 2**10 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }} {{ 2**-1 }} {{ 2**3**2 }}") ==
      "0.3333333333333333 5.0 1e+16 1000000000000000.0 0.0001 1e-05 -4 2 1024 3.0 0.5 0.5 64");
  CHECK(render("{{ 10 - 3 - 2 }} {{ 2 + 3 * 4 }} {{ (2 + 3) * 4 }} {{ 7 / 2 }} {{ 7 // 2 }} {{ 7 % "
               "-3 }} {{ 1 + 1.5 }} {{ 0.1 + 0.2 }} {{ 1e100 }} {{ 123456789.123 }} {{ 1.5e-7 }} "
               "{{ -0.0 }} {{ 100.0 }}") ==
        "5 14 20 3.5 3 -2 2.5 0.30000000000000004 1e+100 123456789.123 1.5e-07 -0.0 100.0");
  CHECK(render(
            "{{ True == 1 }} {{ (1==1) != (2==3) }} {{ 'a' < 'b' }} {{ 1 < 2 < 3 }} {{ 3 > 2 > 2 "
            "}} {{ [1, 2] == [1, 2] }} {{ {'a': 1} == {'a': 1} }} {{ 1 == 1.0 }} {{ 'a' == 1 }}") ==
        "True True True True False True True True False");
  CHECK(render("{{ not true or true }} {{ not (true or true) }} {{ true and 'x' }} {{ false or 'y' "
               "}} {{ none or 0 or 'z' }} {{ 1 and 0 }}") == "True False x y z 0");
  CHECK(render("{{ 'a' ~ 1 ~ none ~ undefined_q ~ 2.0 }} {{ 'a' + 'b' }} {{ [1] + [2] }} {{ 'ab' * "
               "3 }} {{ 3 * 'x' }} {{ [0] * 2 }}") == "a1None2.0 ab [1, 2] ababab xxx [0, 0]");
  CHECK(render("{{ 'x' in 'xyz' }} {{ 'q' not in 'xyz' }} {{ 2 in xs }} {{ 'a' in d }} {{ 'zz' in "
               "d }} {{ 1 in undefined_q }}") == "True True True True False False");
  CHECK(render("{{ 'x' if false }}|{{ 'x' if true }}|{{ 'a' if n else 'b' }}|{{ 'p' if num > 1 "
               "else 'q' if num > 0 else 'r' }}") == "|x|b|p");
  CHECK(render("{{ -1|abs }} {{ not 1 is defined }} {{ not undefined_x is defined }} {{ - 3 ** 2 "
               "}} {{ xs|length - 1 }} {{ xs|length > 2 }}") == "1 False True 9 2 True");
  CHECK(render("{{ \"it's\" }} {{ [\"it's\", 'say \"x\"', 'both \\' \"'] }} {{ 'tab\\tnew\\nline' "
               "}} {{ ['tab\\tnew\\nline\\\\'] }} {{ '\\x41\\u00e9\\U0001F600' }} {{ 'a' 'b' \"c\" "
               "}} {{ 'unknown \\q escape' }}") ==
        "it's [\"it's\", 'say \"x\"', 'both \\' \"'] tab\tnew\nline ['tab\\tnew\\nline\\\\'] Aé😀 "
        "abc unknown \\q escape");
  CHECK(render("{{ \"a\\\nb\" }} {{ '{%' }}{{ '}}' }}{{ {'a': {'b': 1}} }}") ==
        "ab {%}}{'a': {'b': 1}}");
}

TEST_CASE("jinja: tests") {
  CHECK(render("{{ n is none }} {{ n is not none }} {{ s is string }} {{ 1 is number }} {{ 1.5 is "
               "number }} {{ true is number }} {{ 1 is integer }} {{ true is integer }} {{ 1.0 is "
               "float }}") == "True False True True True True True False True");
  CHECK(render("{{ d is mapping }} {{ xs is mapping }} {{ xs is iterable }} {{ s is iterable }} {{ "
               "1 is iterable }} {{ xs is sequence }} {{ 1 is sequence }}") ==
        "True False True True False True False");
  CHECK(
      render("{{ false is false }} {{ 0 is false }} {{ true is true }} {{ 1 is true }} {{ true is "
             "boolean }} {{ 1 is boolean }} {{ undefined_q is undefined }} {{ xs is defined }}") ==
      "True False True False True False True True");
  CHECK(
      render("{{ 3 is odd }} {{ 4 is even }} {{ 9 is divisibleby 3 }} {{ 9 is divisibleby(4) }} {{ "
             "'a' is lower }} {{ 'A' is upper }} {{ 2 is eq 2 }} {{ 2 is ne 3 }} {{ f is callable "
             "}} {{ 2 is in xs }} {{ n is sameas none }} {{ 3 is gt 2 }} {{ 3 is lt 2 }}") ==
      "True True True False True True True True False True True True False");
  CHECK(render("{{ tools is none }} {{ tools is defined }} {{ documents is none }} {{ "
               "enable_thinking is defined }}") == "True True True False");
}

TEST_CASE("jinja: subscripts, slices and attributes") {
  CHECK(render("{{ s[1:3] }} {{ s|length }} {{ xs[::-1] }} {{ s[-1] }} {{ s[::-2] }} {{ xs[1:] }} "
               "{{ xs[:-1] }} {{ xs[5:] }} {{ xs[-10:2] }} {{ xs[::2] }} {{ xs[-1:0:-1] }}") ==
        "él 5 [3, 2, 1] o olh [2, 3] [1, 2] [] [1, 2] [1, 3] [3, 2]");
  CHECK(render("{{ dict(a=1, b=2) }} {{ {'x': none}['x'] }} {{ [1, 2][0] }} {{ msgs[0].role }} {{ "
               "msgs[0]['content'] }} {{ msgs[-1].x }} {{ xs.0 }} {{ d['a'] }}") ==
        "{'a': 1, 'b': 2} None 1 user hi 1 1 2");
  CHECK(
      render(
          "[{{ xs[10] }}|{{ d['nope'] }}|{{ s[100] }}|{{ d.zz }}|{{ none.x }}|{{ msgs[0].x }}]") ==
      "[|||||]");
  CHECK(render("{{ 'abc'[1:] }} {{ 'abc'[:-1] }} {{ 'héllo'[1] }} {{ 'héllo'|length }}") ==
        "bc ab é 5");
}

TEST_CASE("jinja: filters") {
  CHECK(render("{{ xs|length }} {{ xs|count }} {{ d|length }} {{ undefined_q|length }} {{ xs|first "
               "}} {{ xs|last }} {{ s|first }} {{ s|last }} {{ xs|join(', ') }} {{ xs|join }}") ==
        "3 3 2 0 1 3 h o 1, 2, 3 123");
  CHECK(render("{{ xs|reverse|list }} {{ s|reverse }} {{ xs|sum }} {{ xs|min }} {{ xs|max }} {{ "
               "[3, 1, 2]|sort }} {{ [3, 1, 2]|sort(reverse=true) }} {{ ['b', 'A', 'a']|sort }} {{ "
               "[1, 2, 1]|unique|list }}") ==
        "[3, 2, 1] olléh 6 1 3 [1, 2, 3] [3, 2, 1] ['A', 'a', 'b'] [1, 2]");
  CHECK(render("{{ msgs|map(attribute='role')|join(',') }} {{ msgs|selectattr('role', 'equalto', "
               "'user')|list|length }} {{ msgs|rejectattr('role', 'equalto', "
               "'user')|map(attribute='content')|first }} {{ msgs|selectattr('x')|list|length }} "
               "{{ msgs|selectattr('x', 'defined')|list|length }}") == "user,assistant 1 yo 1 1");
  CHECK(
      render(
          "{{ xs|select('odd')|list }} {{ xs|reject('odd')|list }} {{ ['a', 'b']|map('upper')|list "
          "}} {{ msgs|map(attribute='x', default=0)|list }} {{ xs|map('string')|join('-') }}") ==
      "[1, 3] [2] ['A', 'B'] [0, 1] 1-2-3");
  CHECK(render("{{ undefined_q|default('dflt') }} {{ n|default('dflt') }} {{ e|default('dflt', "
               "true) }} {{ e|d('x', boolean=true) }} {{ 'v'|default('dflt') }}") ==
        "dflt None dflt x v");
  CHECK(render("{{ '42'|int }} {{ '4.7'|int }} {{ 'x'|int }} {{ 'x'|int(5) }} {{ 3.9|int }} {{ "
               "'2.5'|float }} {{ 3|float }} {{ 1|string }} {{ none|string }} {{ [1]|string }} {{ "
               "'ab'|list }}") == "42 4 0 5 3 2.5 3.0 1 None [1] ['a', 'b']");
  CHECK(render("{{ d|items|list }} {{ d|dictsort }} {{ 2.567|round(2) }} {{ 2.5|round }} {{ "
               "3.5|round }} {{ 2.1|round(0, 'ceil') }}") ==
        "[('b', 1), ('a', 2)] [('a', 2), ('b', 1)] 2.57 2.0 4.0 3.0");
  CHECK(render("{{ '<a href=\"x\">'|e }} {{ '<b>'|safe }} {{ 'x'|escape }} {{ s|upper }} {{ "
               "'ÉCOLE'|lower }} {{ 'straße'|upper }} {{ 'hello world'|capitalize }} {{ "
               "'hello-world foo'|title }}") ==
        "&lt;a href=&#34;x&#34;&gt; <b> x HÉLLO école STRASSE Hello world Hello-World Foo");
  CHECK(render("{{ t|trim }}|{{ t|trim('a ') }}|{{ 'aXa'|replace('a', 'b') }}|{{ "
               "'aaa'|replace('a', 'b', 2) }}|{{ 'abc'|replace('', '-') }}") ==
        "a b|b|bXb|bba|-a-b-c-");
  CHECK(render("{{ 'hello\\nworld\\n\\nx'|indent(2) }}|{{ 'hello\\nworld'|indent(2, true) }}|{{ "
               "'a\\n\\nb'|indent(2, blank=true) }}") ==
        "hello\n  world\n\n  x|  hello\n  world|a\n  \n  b");
  CHECK(render("{{ '%s-%s'|format(1, 'a') }} {{ '%d%%'|format(5) }} {{ 'v=%s' % 3 }} {{ '%s %s' % "
               "(1, 2) }}") == "1-a 5% v=3 1 2");
}

TEST_CASE("jinja: string and dict methods") {
  CHECK(render("{{ t.strip() }}|{{ t.lstrip() }}|{{ t.rstrip() }}|{{ 'xxaxx'.strip('x') }}|{{ "
               "'\\n\\na\\n'.lstrip('\\n') }}|{{ 'abc'.rstrip('cb') }}|{{ '\\n x \\n'.strip('\\n') "
               "}}") == "a b|a b  |  a b|a|a\n|a| x ");
  CHECK(render("{{ 'a,b,,c'.split(',') }} {{ t.split() }} {{ 'a b c'.split(' ', 1) }} {{ 'a b c  "
               "'.split(None, 1) }} {{ 'a,b,c'.rsplit(',', 1) }} {{ ''.split() }} {{ ''.split(',') "
               "}} {{ 'x</think>y'.split('</think>')[-1] }}") ==
        "['a', 'b', '', 'c'] ['a', 'b'] ['a', 'b c'] ['a', 'b c  '] ['a,b', 'c'] [] [''] y");
  CHECK(
      render(
          "{{ 'Hello'.startswith('He') }} {{ 'Hello'.endswith('lo') }} {{ 'Hello'.startswith(('x', "
          "'H')) }} {{ 'Hello'.endswith('x') }} {{ 'Hello'.startswith('l', 2) }}") ==
      "True True True False True");
  CHECK(
      render("{{ 'hello world'.title() }} {{ 'hello WORLD'.capitalize() }} {{ 'abc'.upper() }} {{ "
             "'ABC'.lower() }} {{ 'aXa'.replace('a', 'b') }} {{ 'aaa'.replace('a', 'b', 2) }}") ==
      "Hello World Hello world ABC abc bXb bba");
  CHECK(render("{{ s.find('l') }} {{ s.count('l') }} {{ s.rfind('l') }} {{ 'x'.find('q') }} {{ "
               "','.join(['a', 'b']) }} {{ 'abc'.isdigit() }} {{ '12'.isdigit() }} {{ ' "
               "'.isspace() }} {{ 'Ab'.isupper() }} {{ 'AB'.isupper() }}") ==
        "2 2 3 -1 a,b False True True False True");
  CHECK(render("{{ '{} and {}'.format(1, 'b') }} {{ '{0}{1}{0}'.format('a', 'b') }} {{ "
               "'{x}!'.format(x=3) }} {{ 'a\\nb\\r\\nc'.splitlines() }} {{ 'ab'.removeprefix('a') "
               "}} {{ 'a=b=c'.partition('=') }}") ==
        "1 and b aba 3! ['a', 'b', 'c'] b ('a', '=', 'b=c')");
  CHECK(render("{{ d.keys()|list }} {{ d.values()|list }} {{ d.get('a') }} {{ d.get('zz') }} {{ "
               "d.get('zz', 5) }} {{ d.items()|list }} {{ [1, 2, 1].count(1) }} {{ [1, 2].index(2) "
               "}}") == "['b', 'a'] [1, 2] 2 None 5 [('b', 1), ('a', 2)] 2 1");
}

TEST_CASE("jinja: tojson") {
  CHECK(render("{{ xs|tojson }} {{ d|tojson }} {{ \"é<>&'\\n\\t\\u0001\\\"\\\\\"|tojson }} {{ "
               "[1.0, 2.5e20, none, true, {}, []]|tojson }} {{ d|tojson(sort_keys=true) }}") ==
        "[1, 2, 3] {\"b\": 1, \"a\": 2} \"é<>&'\\n\\t\\u0001\\\"\\\\\" [1.0, 2.5e+20, null, true, "
        "{}, []] {\"a\": 2, \"b\": 1}");
  CHECK(
      render("{{ d|tojson(indent=2) }}\n{{ {'a': [1, {'b': 'c'}], 'e': []}|tojson(indent=4) }}") ==
      "{\n  \"b\": 1,\n  \"a\": 2\n}\n{\n    \"a\": [\n        1,\n        {\n            \"b\": "
      "\"c\"\n        }\n    ],\n    \"e\": []\n}");
  CHECK(render("{{ msgs|tojson }} {{ 'x'|tojson }} {{ 3|tojson }} {{ 1.5|tojson }} {{ {'k': "
               "none}|tojson(separators=(',', ':')) }}\n") ==
        "[{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": "
        "\"yo\", \"x\": 1}] \"x\" 3 1.5 {\"k\":null}");
}
TEST_CASE("the fixture templates on paths their cases do not reach (expected from jinja2)") {
  {
    auto fx = load_fixture("qwen3");
    if (!fx)
      return;
    {
      INFO("qwen3: tools, a tool call with dict arguments and its result");
      ojson extra = fx->extra;
      extra.update(ojson::parse(
          "{\"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", "
          "\"description\": \"Weather for a city\", \"parameters\": {\"type\": \"object\", "
          "\"properties\": {\"city\": {\"type\": \"string\"}, \"unit\": {\"type\": \"string\", "
          "\"enum\": [\"c\", \"f\"]}}, \"required\": [\"city\"]}}}]}"));
      auto out = fx->tpl.render(
          ojson::parse(
              "[{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", "
              "\"content\": \"Weather in Paris?\"}, {\"role\": \"assistant\", \"content\": \"\", "
              "\"tool_calls\": [{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", "
              "\"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}}]}, {\"role\": \"tool\", "
              "\"content\": \"{\\\"temp\\\": 21}\"}, {\"role\": \"tool\", \"content\": \"second "
              "result\"}, {\"role\": \"assistant\", \"content\": \"It is 21 °C.\"}, {\"role\": "
              "\"user\", \"content\": \"Thanks\"}]"),
          true, extra);
      REQUIRE(out.ok());
      CHECK(*out ==
            "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to "
            "assist with the user query.\n\nYou are provided with function signatures within "
            "<tools></tools> XML tags:\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": "
            "\"get_weather\", \"description\": \"Weather for a city\", \"parameters\": {\"type\": "
            "\"object\", \"properties\": {\"city\": {\"type\": \"string\"}, \"unit\": {\"type\": "
            "\"string\", \"enum\": [\"c\", \"f\"]}}, \"required\": [\"city\"]}}}\n</tools>\n\nFor "
            "each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
            "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather "
            "in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", "
            "\"arguments\": {\"city\": \"Paris\", \"unit\": "
            "\"c\"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp\": "
            "21}\n</tool_response>\n<tool_response>\nsecond "
            "result\n</tool_response><|im_end|>\n<|im_start|>assistant\nIt is 21 "
            "°C.<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n");
    }
    {
      INFO("qwen3: reasoning_content and a <think> split in history");
      ojson extra = fx->extra;
      auto out = fx->tpl.render(
          ojson::parse(
              "[{\"role\": \"user\", \"content\": \"2+2?\"}, {\"role\": \"assistant\", "
              "\"content\": \"<think>\\nadd them\\n</think>\\n\\n4\"}, {\"role\": \"user\", "
              "\"content\": \"<tool_response>x</tool_response>\"}, {\"role\": \"assistant\", "
              "\"content\": \"done\", \"reasoning_content\": \"thought about it\"}]"),
          false, extra);
      REQUIRE(out.ok());
      CHECK(*out ==
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nadd "
            "them\n</think>\n\n4<|im_end|>\n<|im_start|>user\n<tool_response>x</"
            "tool_response><|im_end|>\n<|im_start|>assistant\n<think>\nthought about "
            "it\n</think>\n\ndone<|im_end|>\n");
    }
    {
      INFO("qwen3: enable_thinking false");
      ojson extra = fx->extra;
      extra.update(ojson::parse("{\"enable_thinking\": false}"));
      auto out =
          fx->tpl.render(ojson::parse("[{\"role\": \"user\", \"content\": \"hi\"}]"), true, extra);
      REQUIRE(out.ok());
      CHECK(*out ==
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
    }
    {
      INFO("qwen3: string tool-call arguments, no content");
      ojson extra = fx->extra;
      auto out = fx->tpl.render(
          ojson::parse("[{\"role\": \"user\", \"content\": \"go\"}, {\"role\": \"assistant\", "
                       "\"content\": \"\", \"tool_calls\": [{\"function\": {\"name\": \"f\", "
                       "\"arguments\": \"{\\\"a\\\": 1}\"}}, {\"function\": {\"name\": \"g\", "
                       "\"arguments\": {\"b\": [1, 2]}}}]}]"),
          false, extra);
      REQUIRE(out.ok());
      CHECK(*out ==
            "<|im_start|>user\ngo<|im_end|>\n<|im_start|>assistant\n<think>\n\n</"
            "think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": "
            "1}}\n</tool_call>\n<tool_call>\n{\"name\": \"g\", \"arguments\": {\"b\": [1, "
            "2]}}\n</tool_call><|im_end|>\n");
    }
  }
  {
    auto fx = load_fixture("deepseek_v3");
    if (!fx)
      return;
    {
      INFO("deepseek_v3: tool calls, tool outputs and two system messages");
      ojson extra = fx->extra;
      auto out = fx->tpl.render(
          ojson::parse(
              "[{\"role\": \"system\", \"content\": \"A.\"}, {\"role\": \"system\", \"content\": "
              "\"B.\"}, {\"role\": \"user\", \"content\": \"Weather?\"}, {\"role\": \"assistant\", "
              "\"content\": null, \"tool_calls\": [{\"type\": \"function\", \"function\": "
              "{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Paris\\\"}\"}}, "
              "{\"type\": \"function\", \"function\": {\"name\": \"get_time\", \"arguments\": "
              "\"{}\"}}]}, {\"role\": \"tool\", \"content\": \"21C\"}, {\"role\": \"tool\", "
              "\"content\": \"noon\"}, {\"role\": \"assistant\", \"content\": \"21C at noon.\"}, "
              "{\"role\": \"user\", \"content\": \"ok\"}]"),
          true, extra);
      REQUIRE(out.ok());
      CHECK(*out ==
            "<｜begin▁of▁sentence｜>A.\n\nB.<｜User｜>Weather?<｜Assistant｜><｜tool▁calls▁begin｜>"
            "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": "
            "\"Paris\"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_"
            "time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜><"
            "｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>21C<｜tool▁output▁end｜>\n<"
            "｜tool▁output▁begin｜>noon<｜tool▁output▁end｜><｜tool▁outputs▁end｜>21C at "
            "noon.<｜end▁of▁sentence｜><｜User｜>ok<｜Assistant｜>");
    }
    {
      INFO("deepseek_v3: ends on a tool output");
      ojson extra = fx->extra;
      auto out = fx->tpl.render(
          ojson::parse(
              "[{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": "
              "null, \"tool_calls\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", "
              "\"arguments\": \"{}\"}}]}, {\"role\": \"tool\", \"content\": \"r\"}]"),
          true, extra);
      REQUIRE(out.ok());
      CHECK(*out ==
            "<｜begin▁of▁sentence｜><｜User｜>x<｜Assistant｜><｜tool▁calls▁begin｜><"
            "｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{}\n```<｜tool▁call▁end｜><"
            "｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>r<｜tool▁output▁end｜><"
            "｜tool▁outputs▁end｜>");
    }
  }
  {
    auto fx = load_fixture("mistral");
    if (!fx)
      return;
    {
      INFO("mistral: no system message, a longer conversation");
      ojson extra = fx->extra;
      auto out = fx->tpl.render(
          ojson::parse("[{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", "
                       "\"content\": \"b\"}, {\"role\": \"user\", \"content\": \"c\"}, {\"role\": "
                       "\"assistant\", \"content\": \"d\"}]"),
          false, extra);
      REQUIRE(out.ok());
      CHECK(*out == "<s> [INST] a [/INST] b</s> [INST] c [/INST] d</s>");
    }
    {
      INFO("mistral: an unsupported role raises");
      ojson extra = fx->extra;
      auto out = fx->tpl.render(ojson::parse("[{\"role\": \"user\", \"content\": \"a\"}, "
                                             "{\"role\": \"tool\", \"content\": \"b\"}]"),
                                false, extra);
      REQUIRE_FALSE(out.ok());
      CHECK(out.err().code == error_code::invalid_argument);
      CHECK(out.err().message ==
            "Only user and assistant roles are supported, with the exception of an initial "
            "optional system message!");
    }
  }
}

TEST_CASE("jinja: corners found by differential fuzzing against jinja2") {
  CHECK(render("{{ 0|round(1) }} {{ true|round }} {{ 2.25|round(1) }} {{ 3|round(0, 'floor') }} "
               "{{ 3.0 is odd }} {{ 4.0 is even }} {{ 7.5 is divisibleby 2.5 }} "
               "{{ none|select('odd')|list }} {{ 0|map('string')|list }} "
               "{{ ''|selectattr('x')|list }}") == "0 1 2.2 3.0 True True True [] [] []");
  CHECK(error_of("{{ num[1:] }}").find("'int' object is not subscriptable") != std::string::npos);
}

TEST_CASE("undefined values follow jinja2's default Undefined") {
  CHECK(render("[{{ nope }}][{{ nope ~ 'x' }}][{{ nope|length }}][{{ nope|default('d') }}]") ==
        "[][x][0][d]");
  CHECK(render("{{ nope is defined }} {{ d.zz is defined }} {{ nope == nope }} {{ nope in xs }}") ==
        "False False True False");
  CHECK(render("{% for x in nope %}x{% endfor %}{% if nope %}x{% endif %}|") == "|");
  CHECK(error_of("{{ nope.attr }}") == "chat template error at line 1: 'nope' is undefined");
  CHECK(error_of("\n\n{{ d.zz.y }}") ==
        "chat template error at line 3: 'dict object' has no attribute 'zz'");
  CHECK(error_of("{{ nope + 'x' }}").find("'nope' is undefined") != std::string::npos);
  CHECK(error_of("{{ nope() }}").find("'nope' is undefined") != std::string::npos);
  CHECK(error_of("{{ nope[0] }}").find("'nope' is undefined") != std::string::npos);
  CHECK(error_of("{{ nope|tojson }}").find("not JSON serializable") != std::string::npos);
}

TEST_CASE("raise_exception gives the template's own message, as transformers does") {
  auto out = try_render("a{{ raise_exception('bad ' ~ 'role: ' ~ xs[0]) }}b");
  REQUIRE_FALSE(out.ok());
  CHECK(out.err().code == error_code::invalid_argument);
  CHECK(out.err().message == "bad role: 1");
}

TEST_CASE("runtime type errors are errors naming the line, never crashes") {
  CHECK(error_of("{{ 1 + 'a' }}") ==
        "chat template error at line 1: unsupported operand type(s) for +: 'int' and 'str'");
  CHECK(error_of("{{ 'a' + 1 }}").find("can only concatenate str") != std::string::npos);
  CHECK(error_of("{{ 'a' < 1 }}").find("'<' not supported between") != std::string::npos);
  CHECK(error_of("{{ 1 / 0 }}").find("division by zero") != std::string::npos);
  CHECK(error_of("{{ 1 // 0 }}").find("division or modulo by zero") != std::string::npos);
  CHECK(error_of("{{ 5() }}").find("'int' object is not callable") != std::string::npos);
  CHECK(error_of("{{ xs.append(4) }}").find("unsafe") != std::string::npos);
  CHECK(error_of("{% for a, b in [[1, 2, 3]] %}{% endfor %}").find("too many values to unpack") !=
        std::string::npos);
  CHECK(error_of("{% set q = 1 %}{% set q.x = 2 %}").find("non-namespace") != std::string::npos);
  CHECK(error_of("{{ 'ab'.split('') }}").find("empty separator") != std::string::npos);
  CHECK(error_of("{{ 1|nosuchfilter }}").find("no filter named 'nosuchfilter'") !=
        std::string::npos);
  CHECK(error_of("{{ 1 is nosuchtest }}").find("no test named 'nosuchtest'") != std::string::npos);
  CHECK(error_of("{{ 9223372036854775807 + 1 }}").find("integer overflow") != std::string::npos);
  CHECK(error_of("{{ msgs[0].content.startswith(1) }}").find("startswith") != std::string::npos);
  CHECK(error_of("line 1\n{% for m in msgs %}\n{{ m.content + 1 }}\n{% endfor %}").find("line 3") !=
        std::string::npos);
}

TEST_CASE("syntax errors name the line, the column and what was expected") {
  CHECK(syntax_error_of("{% for x in xs %}{{ x }}") ==
        "chat template syntax error at line 1, column 25: unexpected end of template, expected "
        "'endfor' or 'else' to close the block opened at line 1");
  CHECK(syntax_error_of("{% if x %}{% endfor %}") ==
        "chat template syntax error at line 1, column 14: unknown tag 'endfor', expected 'elif', "
        "'else' or 'endif'");
  CHECK(syntax_error_of("line1\nline2 {% if x == %}{% endif %}") ==
        "chat template syntax error at line 2, column 18: expected an expression, got '%}'");
  CHECK(syntax_error_of("a\n\n  {{ 'unterminated }}") ==
        "chat template syntax error at line 3, column 6: unterminated string literal");
  CHECK(syntax_error_of("{{ 1 2 }}") ==
        "chat template syntax error at line 1, column 6: expected '}}', got a number");
  CHECK(syntax_error_of("{{ (1 }}") ==
        "chat template syntax error at line 1, column 7: unexpected '}', expected ')'");
  CHECK(syntax_error_of("{{ x").find("expected '}}'") != std::string::npos);
  CHECK(syntax_error_of("{# open").find("missing end of comment") != std::string::npos);
  CHECK(syntax_error_of("{% foo %}").find("unknown tag 'foo'") != std::string::npos);
  CHECK(syntax_error_of("{% endif %}").find("unknown tag 'endif'") != std::string::npos);
  CHECK(syntax_error_of("{% break %}").find("outside of a for loop") != std::string::npos);
  CHECK(syntax_error_of("{% include 'x' %}").find("not supported") != std::string::npos);
  CHECK(syntax_error_of("{% for in xs %}{% endfor %}") ==
        "chat template syntax error at line 1, column 11: expected 'in' after the loop variable, "
        "got 'xs'");
  CHECK(syntax_error_of("h\u00e9 {{ ] }}").find("column 7") != std::string::npos);  // characters
}

// ctest's TIMEOUT catches a hang; each limit must answer with its error.
TEST_CASE("hostile templates hit limits instead of hanging or overflowing the stack") {
  auto repeat = [](const std::string& s, int n) {
    std::string out;
    for (int k = 0; k < n; ++k)
      out += s;
    return out;
  };
  {
    CHECK(syntax_error_of("{{ " + repeat("(", 5000) + "1" + repeat(")", 5000) + " }}")
              .find("nested too deeply") != std::string::npos);
    CHECK(syntax_error_of("{{ " + repeat("[", 5000) + repeat("]", 5000) + " }}")
              .find("nested too deeply") != std::string::npos);
    CHECK(syntax_error_of("{{ 1" + repeat(" + 1", 100000) + " }}").find("nested too deeply") !=
          std::string::npos);
    CHECK(syntax_error_of("{{ " + repeat("not ", 100000) + "1 }}").find("nested too deeply") !=
          std::string::npos);
    CHECK(syntax_error_of(repeat("{% if true %}", 5000) + repeat("{% endif %}", 5000))
              .find("nested too deeply") != std::string::npos);
    // long but flat is fine
    CHECK(render("{{ 1" + repeat(" ~ 1", 2000) + " }}") == repeat("1", 2001));
  }
  {
    CHECK(error_of("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}"
                   "{% endfor %}")
              .find("steps") != std::string::npos);
    CHECK(error_of("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}").find("nested") !=
          std::string::npos);
    CHECK(error_of("{% set ns = namespace(s='xx') %}{% for i in range(100) %}"
                   "{% set ns.s = ns.s + ns.s %}{% endfor %}")
              .find("too long") != std::string::npos);
    CHECK(error_of("{{ 'x' * 10000000000 }}").find("too long") != std::string::npos);
    CHECK(error_of("{{ [1] * 10000000000 }}").find("too long") != std::string::npos);
    CHECK(error_of("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}").find("longer") !=
          std::string::npos);
    CHECK(error_of("{{ range(100000000)|length }}").find("range too large") != std::string::npos);
    CHECK(error_of("{{ 2 ** 100000000000 }}").find("overflow") != std::string::npos);
    CHECK(error_of("{% set ns = namespace(v=[]) %}{% for i in range(100000) %}"
                   "{% set ns.v = [ns.v] %}{% endfor %}")
              .find("nested deeper") != std::string::npos);
    CHECK(error_of("{% set ns = namespace(l=['x' * 1000000]) %}{% for i in range(30) %}"
                   "{% set ns.l = ns.l + ns.l %}{% endfor %}")
              .find("too long") != std::string::npos);
    CHECK(error_of("{% set ns = namespace() %}{% macro m() %}{% set ns.c = caller %}"
                   "{{ caller() }}{% endmacro %}{% call m() %}in{% endcall %}{{ ns.c() }}")
              .find("after its 'call' block ended") != std::string::npos);
    // a namespace holding itself, and a long chain of namespaces, are torn down safely
    CHECK(render("{% set ns = namespace() %}{% set ns.me = ns %}{% set ns.l = [ns] %}"
                 "{{ ns.l|length }}") == "1");
    CHECK(render("{% set ns = namespace(v=none) %}{% for i in range(100000) %}"
                 "{% set ns.v = namespace(p=ns.v) %}{% endfor %}ok") == "ok");
  }
  // deeply nested input data is refused, not recursed into
  ojson deep = ojson::array();
  for (int k = 0; k < 1000; ++k)
    deep = ojson::array({deep});
  auto out = chat_template::chatml().render(deep, false, ojson::object());
  REQUIRE_FALSE(out.ok());
  CHECK(out.err().message.find("nested deeper") != std::string::npos);
}

TEST_CASE("chatml() is the ChatML fallback") {
  ojson messages = ojson::parse(R"([{"role": "system", "content": "S"},
                                    {"role": "user", "content": "U"}])");
  auto a = chat_template::chatml().render(messages, true, ojson::object());
  REQUIRE(a.ok());
  CHECK(*a ==
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\n");
  auto b = chat_template::chatml().render(messages, false, ojson::object());
  REQUIRE(b.ok());
  CHECK(*b == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
}

TEST_CASE("render variables: special tokens, tools, documents, strftime_now") {
  auto tpl = chat_template::parse(
      "[{{ bos_token }}|{{ eos_token }}|{{ pad_token is defined }}|{{ tools is none }}|"
      "{{ documents is none }}|{{ additional_special_tokens|join(',') }}]");
  REQUIRE(tpl.ok());
  auto out = tpl->render(ojson::array(), false, ojson::parse(R"({
      "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
      "eos_token": "</s>", "pad_token": null,
      "additional_special_tokens": ["<a>", {"content": "<b>"}]})"));
  REQUIRE(out.ok());
  CHECK(*out == "[<s>|</s>|False|True|True|<a>,<b>]");

  auto with_tools = tpl->render(ojson::array(), false, ojson::parse(R"({"tools": [1]})"));
  REQUIRE(with_tools.ok());
  CHECK(*with_tools == "[||False|False|True|]");

  auto year = try_render("{{ strftime_now('%Y')|length }}{{ strftime_now('%d %B %Y') is string }}");
  REQUIRE(year.ok());
  CHECK(*year == "4True");
}

TEST_CASE("tojson keeps the request's key order with ordered_json") {
  auto tpl = chat_template::parse(
      "{{ messages[0]|tojson }}|{% for k, v in messages[0]|items %}"
      "{{ k }}{% endfor %}");
  REQUIRE(tpl.ok());
  auto out = tpl->render(ojson::parse(R"([{"z": 1, "a": {"y": "\u00e9", "b": [true, null]}}])"),
                         false, ojson::object());
  REQUIRE(out.ok());
  CHECK(*out == "{\"z\": 1, \"a\": {\"y\": \"\u00e9\", \"b\": [true, null]}}|za");
}

TEST_CASE("a parsed template is shared, copyable and renders from many threads") {
  auto parsed = chat_template::parse("{% for m in messages %}{{ m.content }}{% endfor %}");
  REQUIRE(parsed.ok());
  chat_template copy = *parsed;
  ojson messages = ojson::parse(R"([{"content": "a"}, {"content": "b"}])");
  std::vector<std::thread> threads;
  std::atomic<int> good{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int k = 0; k < 200; ++k) {
        auto out = copy.render(messages, false, ojson::object());
        if (out.ok() && *out == "ab")
          ++good;
      }
    });
  for (auto& t : threads)
    t.join();
  CHECK(good == 800);
}
