#pragma once

// `moert tokenize --tokenizer DIR --in REQ.json --out OUT.json`: a batch of encode, decode and
// chat-template requests against a Hugging Face tokenizer folder, answered item by item in the
// order given. File I/O and JSON shapes live here; tokenizer/ sees texts and ids only.

#include "commands.hpp"

namespace moert::cli {

command_runner add_tokenize_command(CLI::App& app);

}  // namespace moert::cli
