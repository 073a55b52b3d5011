#pragma once

// How an attention shard cuts and orders one step (FinDEP, ../shared/reference/findep.md §3).

#include <cstddef>
#include <optional>
#include <string_view>

namespace moert::policy {

enum class segment_order {
  aass,    // every micro-batch's attention, then every attention-side FFN
  asas,    // attention and attention-side FFN alternate per micro-batch
  pppipe,  // ASAS with A2E after the attention-side FFN, one chunk (MegaScale-Infer)
};

std::string_view to_string(segment_order order);
std::optional<segment_order> parse_segment_order(std::string_view name);

struct execution_plan {
  std::size_t r1 = 1;   // micro-batches per step (m_a, when set, wins)
  std::size_t m_a = 0;  // sequences per micro-batch; 0 = ceil(batch / r1)
  std::size_t r2 = 1;   // A2E chunks per micro-batch (PPPipe uses 1)
  segment_order order = segment_order::asas;
};

}  // namespace moert::policy
