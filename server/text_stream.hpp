#pragma once

// Generated tokens → the text a client receives, incrementally: detokenized (an incomplete
// UTF-8 character is held back until its last byte arrives) and cut at the first stop string.
// Text that could still become the start of a stop string is held back until it no longer can;
// the stop string itself is never returned; at the end everything held back is flushed.
// The concatenation of every push() and finish() equals the full decode cut before the first
// stop string (tested).
//
// Thread safety: one text_stream per request, used from one thread at a time.

#include "tokenizer/tokenizer.hpp"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moert::server {

// Incremental text of token ids.
class detokenizer {
public:
  virtual ~detokenizer() = default;
  // The text that this id completes (may be empty while a character is incomplete).
  virtual std::string push(std::int32_t id) = 0;
  // Whatever is still held back (an incomplete character as U+FFFD).
  virtual std::string flush() = 0;
  // One token's own text (for logprobs).
  virtual std::string token_text(std::int32_t id) const = 0;
};

// Through a Hugging Face tokenizer (tokenizer::decode_stream). Special tokens are skipped
// when `skip_special_tokens`, as OpenAI-style servers do for generated text.
std::unique_ptr<detokenizer> make_tokenizer_detokenizer(std::shared_ptr<const tokenizer::tokenizer> tok,
                                                        bool skip_special_tokens = true);

// Without a tokenizer: the ids as decimal numbers separated by single spaces ("5 17 3").
std::unique_ptr<detokenizer> make_id_detokenizer();

class text_stream {
public:
  text_stream(std::unique_ptr<detokenizer> detok, std::vector<std::string> stop_strings);

  // The text that can be released after this token; once stopped() it returns "" forever.
  std::string push(std::int32_t id);
  // The rest at the end of generation (held-back text, an incomplete character).
  std::string finish();
  // A stop string was found; the text before it has been (or is being) returned.
  bool stopped() const { return stopped_; }
  const std::string& matched_stop() const { return matched_; }

  std::string token_text(std::int32_t id) const { return detok_->token_text(id); }

private:
  std::string release();

  std::unique_ptr<detokenizer> detok_;
  std::vector<std::string> stops_;
  std::string pending_;  // decoded, not yet returned: it may still start a stop string
  bool stopped_ = false;
  bool finished_ = false;
  std::string matched_;
};

}  // namespace moert::server
