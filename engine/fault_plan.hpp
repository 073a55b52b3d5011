#pragma once

// The fault file (`--faults FILE`, EngineConfig::faults): a JSON object read into a
// transport::fault_plan. Every key is checked; an unknown key, a value of the wrong type or
// out of range is an error naming the key (with its path, e.g. "kill[1].actor") and the file.
//
//   {"seed": 7, "drop": 0.02, "duplicate": 0.02, "reorder": 0.02,
//    "delay": {"probability": 0.05, "max_ms": 5},
//    "kill": [{"actor": "expert", "device": 0, "after_messages": 50}],
//    "slow": [{"device": "expert:1", "factor": 3}],
//    "nodes": [{"node": "e1", "signal": "kill", "after_messages": 40},
//              {"node": "e0", "signal": "stop", "after_messages": 30, "for_ms": 3000}],
//    "retransmit": {"ms": 25, "max_ms": 1000, "max_retries": 12}}
//
// Every key is optional; the probabilities apply per A2E/E2A message and may sum to at most 1.
// "nodes" (a cluster only): the named node signals itself once it has sent after_messages
// A2E/E2A messages; a stop lasts for_ms (required for stop, refused for kill).

#include "core/error.hpp"
#include "transport/fault_injector.hpp"

#include <string>

namespace moert {

using fault_plan = transport::fault_plan;

// `source` names the text in errors (a file name).
result<fault_plan> parse_fault_plan(const std::string& json_text, const std::string& source);
result<fault_plan> load_fault_plan(const std::string& path);

// The plan as JSON (the same keys), e.g. for a report.
std::string to_json(const fault_plan& plan);

}  // namespace moert
