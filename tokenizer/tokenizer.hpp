#pragma once

// Hugging Face `tokenizer.json` tokenizers: byte-level BPE with a regex pre-tokenizer and an
// optional NFC normalizer (Qwen2/Qwen3, DeepSeek), and SentencePiece-style BPE over "▁" text
// with byte fallback (Mistral, Mixtral, Llama). Added and special tokens are split out of the
// text before the model runs. Behaviour follows Hugging Face `tokenizers` plus the
// transformers rules for what `add_special_tokens` adds (../shared/fixtures/tokenizers).
//
// Thread safety: a loaded tokenizer is immutable; encode/decode may run on any thread at once.

#include "core/error.hpp"
#include "tokenizer/chat_template.hpp"

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moert::tokenizer {

class tokenizer {
public:
  // Reads DIR/tokenizer.json, DIR/tokenizer_config.json (optional) and the chat template
  // (tokenizer_config.json's `chat_template`, else DIR/chat_template.jinja, else ChatML).
  // Errors name the file and the key.
  static result<std::shared_ptr<const tokenizer>> load(const std::string& dir);

  std::vector<std::int32_t> encode(std::string_view text, bool add_special_tokens) const;
  // skip_special_tokens=false keeps special tokens as their text (as transformers does).
  std::string decode(std::span<const std::int32_t> ids, bool skip_special_tokens = false) const;

  std::size_t vocab_size() const;                 // including added tokens
  std::optional<std::int32_t> token_to_id(std::string_view token) const;
  // The token's text as the vocabulary spells it (added tokens first); nullopt for an id
  // that names no token.
  std::optional<std::string> id_to_token(std::int32_t id) const;
  bool is_special(std::int32_t id) const;          // an added token marked special
  std::optional<std::int32_t> bos_id() const;
  std::optional<std::int32_t> eos_id() const;      // tokenizer_config.json's eos_token
  std::string bos_token() const;                   // "" when none
  std::string eos_token() const;
  const chat_template& chat() const;
  // The variables transformers hands a chat template besides messages: bos_token, eos_token,
  // unk_token, pad_token and additional_special_tokens where tokenizer_config.json sets them,
  // tools and documents as null.
  const nlohmann::json& chat_variables() const;
  // chat().render(messages, add_generation_prompt, chat_variables()).
  result<std::string> apply_chat_template(const nlohmann::json& messages,
                                          bool add_generation_prompt) const;

  ~tokenizer();
  struct impl;
  explicit tokenizer(std::unique_ptr<impl> state);

private:
  friend class decode_stream;
  std::unique_ptr<impl> impl_;
};

// Incremental decode for streaming: push ids, get the text they complete. An incomplete UTF-8
// sequence is held back until its last byte arrives (or flush() gives it up as U+FFFD, as the
// full decode would); so is a run of SentencePiece byte tokens (<0xAB>), because one bad byte
// turns the whole run into U+FFFDs. The concatenation of every push() and the final flush()
// equals decode(all ids, skip_special_tokens). flush() ends the stream; pushing after it starts
// a new one. A push costs a decode of a short window, not of the whole stream.
// Thread safety: one stream per request, used from one thread at a time.
class decode_stream {
public:
  explicit decode_stream(std::shared_ptr<const tokenizer> tok, bool skip_special_tokens = false);
  std::string push(std::int32_t id);
  std::string flush();

private:
  std::shared_ptr<const tokenizer> tok_;
  bool skip_special_;
  std::vector<std::int32_t> ids_;
  std::size_t emitted_bytes_ = 0;  // bytes of decode(ids_) already returned
};

}  // namespace moert::tokenizer
