#include "server/text_stream.hpp"

#include <algorithm>

namespace moert::server {

namespace {

class tokenizer_detokenizer final : public detokenizer {
public:
  tokenizer_detokenizer(std::shared_ptr<const tokenizer::tokenizer> tok, bool skip_special)
      : tok_(tok), stream_(std::move(tok), skip_special) {}

  std::string push(std::int32_t id) override { return stream_.push(id); }
  std::string flush() override { return stream_.flush(); }
  std::string token_text(std::int32_t id) const override {
    const std::int32_t ids[] = {id};
    return tok_->decode(ids, false);
  }

private:
  std::shared_ptr<const tokenizer::tokenizer> tok_;
  tokenizer::decode_stream stream_;
};

class id_detokenizer final : public detokenizer {
public:
  std::string push(std::int32_t id) override {
    std::string out = (first_ ? "" : " ") + std::to_string(id);
    first_ = false;
    return out;
  }
  std::string flush() override { return {}; }
  std::string token_text(std::int32_t id) const override { return std::to_string(id); }

private:
  bool first_ = true;
};

}  // namespace

std::unique_ptr<detokenizer> make_tokenizer_detokenizer(std::shared_ptr<const tokenizer::tokenizer> tok,
                                                        bool skip_special_tokens) {
  return std::make_unique<tokenizer_detokenizer>(std::move(tok), skip_special_tokens);
}

std::unique_ptr<detokenizer> make_id_detokenizer() {
  return std::make_unique<id_detokenizer>();
}

text_stream::text_stream(std::unique_ptr<detokenizer> detok, std::vector<std::string> stop_strings)
    : detok_(std::move(detok)), stops_(std::move(stop_strings)) {
  stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string{}), stops_.end());
}

std::string text_stream::push(std::int32_t id) {
  if (stopped_ || finished_)
    return {};
  pending_ += detok_->push(id);
  return release();
}

std::string text_stream::finish() {
  if (stopped_ || finished_)
    return {};
  pending_ += detok_->flush();
  std::string out = release();
  finished_ = true;
  if (!stopped_) {  // nothing can complete a stop string any more
    out += pending_;
    pending_.clear();
  }
  return out;
}

// Returns what no stop string can claim any more, keeps the rest in pending_.
std::string text_stream::release() {
  // Every stop string that occurs starts inside pending_: text was released only once no stop
  // string could start in it. The earliest occurrence wins; on a tie, the longest string.
  std::size_t cut = std::string::npos;
  for (const auto& stop : stops_) {
    std::size_t at = pending_.find(stop);
    if (at != std::string::npos && (at < cut || (at == cut && stop.size() > matched_.size()))) {
      cut = at;
      matched_ = stop;
    }
  }
  if (cut != std::string::npos) {
    stopped_ = true;
    std::string out = pending_.substr(0, cut);
    pending_.clear();
    return out;
  }
  // Hold back the longest tail of pending_ that is a proper prefix of some stop string. It
  // starts where a stop string's first byte matches, so it never splits a UTF-8 character.
  std::size_t keep = 0;
  for (const auto& stop : stops_) {
    std::size_t longest = std::min(stop.size() - 1, pending_.size());
    for (std::size_t len = longest; len > keep; --len)
      if (pending_.compare(pending_.size() - len, len, stop, 0, len) == 0) {
        keep = len;
        break;
      }
  }
  std::string out = pending_.substr(0, pending_.size() - keep);
  pending_.erase(0, pending_.size() - keep);
  return out;
}

}  // namespace moert::server
