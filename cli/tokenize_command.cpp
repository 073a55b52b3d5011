#include "tokenize_command.hpp"

#include "core/error.hpp"
#include "tokenizer/tokenizer.hpp"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

namespace moert::cli {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct tokenize_options {
  std::string tokenizer_dir;
  std::string in;
  std::string out;
};

int fail(const error& err) {
  std::fprintf(stderr, "moert: error: %s\n", err.what().c_str());
  return 1;
}

result<json> read_request(const std::string& path) {
  std::ifstream in{path, std::ios::binary};
  if (!in)
    return make_error(error_code::io_error, "cannot open " + path);
  std::stringstream text;
  text << in.rdbuf();
  try {
    return json::parse(text.str());
  } catch (const json::parse_error& e) {
    return make_error(error_code::invalid_argument, path + ": malformed JSON: " + e.what());
  }
}

// A bool field that may be absent (then `fallback`, transformers' default) but not of another type.
result<bool> optional_bool(const json& item, const char* key, bool fallback, const std::string& where) {
  auto it = item.find(key);
  if (it == item.end())
    return fallback;
  if (!it->is_boolean())
    return make_error(error_code::invalid_argument, where + "." + key + ": expected true or false");
  return it->get<bool>();
}

result<json> answer(const tokenizer::tokenizer& tok, const json& item, const std::string& where) {
  if (!item.is_object())
    return make_error(error_code::invalid_argument, where + ": expected an object");
  int shapes = item.contains("text") + item.contains("ids") + item.contains("messages");
  if (shapes != 1)
    return make_error(error_code::invalid_argument,
                      where + ": unknown item shape: expected exactly one of \"text\", \"ids\" or \"messages\"");

  if (auto text = item.find("text"); text != item.end()) {
    if (!text->is_string())
      return make_error(error_code::invalid_argument, where + ".text: expected a string");
    auto add_special = optional_bool(item, "add_special_tokens", true, where);
    if (!add_special)
      return add_special.err();
    auto ids = tok.encode(text->get_ref<const std::string&>(), *add_special);
    return json{{"ids", ids}, {"text", tok.decode(ids)}};
  }

  if (auto ids = item.find("ids"); ids != item.end()) {
    if (!ids->is_array())
      return make_error(error_code::invalid_argument, where + ".ids: expected an array of token ids");
    std::vector<std::int32_t> list;
    list.reserve(ids->size());
    for (std::size_t i = 0; i < ids->size(); ++i) {
      const json& id = (*ids)[i];
      std::string at = where + ".ids[" + std::to_string(i) + "]";
      if (!id.is_number_integer())
        return make_error(error_code::invalid_argument, at + ": expected an integer token id");
      auto value = id.get<std::int64_t>();
      if (value < 0 || value > INT32_MAX || !tok.id_to_token(static_cast<std::int32_t>(value)))
        return make_error(error_code::invalid_argument, at + ": token id " + std::to_string(value) +
                                                            " is out of range (the vocabulary has " +
                                                            std::to_string(tok.vocab_size()) + " ids)");
      list.push_back(static_cast<std::int32_t>(value));
    }
    return json{{"text", tok.decode(list)}};
  }

  const json& messages = item["messages"];
  if (!messages.is_array())
    return make_error(error_code::invalid_argument, where + ".messages: expected an array");
  auto add_prompt = optional_bool(item, "add_generation_prompt", false, where);
  if (!add_prompt)
    return add_prompt.err();
  auto rendered = tok.apply_chat_template(messages, *add_prompt);
  if (!rendered)  // raise_exception in the template: the item carries the message
    return json{{"error", rendered.err().message}};
  // The template already wrote the BOS where it wants one; apply_chat_template encodes with
  // add_special_tokens=False.
  auto ids = tok.encode(*rendered, false);
  return json{{"text", *rendered}, {"ids", ids}};
}

int run_tokenize(const tokenize_options& opt) {
  auto tok = tokenizer::tokenizer::load(opt.tokenizer_dir);
  if (!tok)
    return fail(tok.err());
  auto request = read_request(opt.in);
  if (!request)
    return fail(request.err());
  auto items = request->is_object() ? request->find("items") : request->end();
  if (!request->is_object() || items == request->end() || !items->is_array())
    return fail(make_error(error_code::invalid_argument, opt.in + ": expected {\"items\": [...]}"));

  json out_items = json::array();
  for (std::size_t i = 0; i < items->size(); ++i) {
    auto item = answer(**tok, (*items)[i], opt.in + ": items[" + std::to_string(i) + "]");
    if (!item)
      return fail(item.err());
    out_items.push_back(std::move(*item));
  }

  std::string text = json{{"items", std::move(out_items)}}.dump(-1, ' ', false, json::error_handler_t::replace);
  std::ofstream out{opt.out, std::ios::binary};
  out << text << '\n';
  out.close();
  if (!out)
    return fail(make_error(error_code::io_error, "cannot write " + opt.out));
  return 0;
}

}  // namespace

command_runner add_tokenize_command(CLI::App& app) {
  auto opt = std::make_shared<tokenize_options>();
  CLI::App* sub = app.add_subcommand("tokenize", "Encode, decode and render chat templates with a Hugging Face tokenizer");
  sub->add_option("--tokenizer", opt->tokenizer_dir,
                  "Folder with tokenizer.json (and tokenizer_config.json, chat_template.jinja)")
      ->required();
  sub->add_option("--in", opt->in, "REQ.json: {\"items\": [...]}")->required();
  sub->add_option("--out", opt->out, "OUT.json to write: {\"items\": [...]} in the order of REQ")->required();
  sub->footer(
      "Items of REQ.json, and what OUT.json answers for each:\n"
      "  {\"text\": str, \"add_special_tokens\": bool}      -> {\"ids\": encode(text), \"text\": decode(ids)}\n"
      "  {\"ids\": [int]}                                 -> {\"text\": decode(ids)} (special tokens kept)\n"
      "  {\"messages\": [...], \"add_generation_prompt\": bool}\n"
      "                     -> {\"text\": rendered template, \"ids\": its encoding, special tokens not added}\n"
      "                        or {\"error\": message} when the template calls raise_exception.\n"
      "A missing file, malformed JSON, an item of another shape or an id outside the vocabulary\n"
      "is an error: one line on stderr, exit code 1, no OUT.json.");
  return [opt] { return run_tokenize(*opt); };
}

}  // namespace moert::cli
