#pragma once

// Model shapes (configs/models/shapes/*.json) and testbeds (configs/testbeds/*.json) to and from
// JSON text. No file I/O: callers read and write the files. Parse errors name the source and the
// offending key; unknown keys are rejected so that a misspelt key cannot pass silently.
//
// Testbed keys: name, notes, source, units (free text), device_memory_gib, reserved_gib,
// gemm / attention / shared_expert / comm_default {alpha, beta, r2}, comm [{ag, eg, alpha, beta,
// r2}]. α in ms; β in ms per MAC (gemm, attention, shared_expert) or ms per byte (comm).

#include "core/error.hpp"
#include "policy/model_shape.hpp"
#include "policy/perf_model.hpp"

#include <string>
#include <string_view>

namespace moert::policy {

[[nodiscard]] result<model_shape> parse_model_shape(std::string_view json_text, const std::string& source);
std::string to_json(const model_shape& shape);

[[nodiscard]] result<testbed> parse_testbed(std::string_view json_text, const std::string& source);
std::string to_json(const testbed& bed);

}  // namespace moert::policy
