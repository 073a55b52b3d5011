#pragma once

// Which μ-queue an idle expert device drains next (AMoE, ../shared/reference/amoe-eps.md §2.7–2.9).
//
// Pure functions of a queue snapshot and `now`; the mu_queue actor is the glue. Time is any
// monotonic clock's reading as a duration since its epoch; only differences are used.

#include <chrono>
#include <cstddef>
#include <optional>
#include <string_view>
#include <vector>

namespace moert::policy {

enum class queue_policy {
  defrag,  // own tokens + δ-decayed mean density of the next K layers (wrapping)
  mtfs,    // most tokens first
  flfs,    // first (lowest) layer first
};

std::string_view to_string(queue_policy policy);
std::optional<queue_policy> parse_queue_policy(std::string_view name);

struct defrag_params {
  double delta = 0.8;
  std::size_t lookahead = 7;  // K: layers b+1 … b+K are scored
  // A queue whose oldest token has waited longer than this is served first (oldest first).
  // Zero disables the guard.
  std::chrono::nanoseconds max_wait = std::chrono::milliseconds{100};
  // The policy picks the layer; within it, the queue whose oldest token arrived first goes
  // first (the policy's own score breaks ties). So a micro-batch that reached the layer first
  // finishes it first, and its next attention runs while the expert device serves the later
  // micro-batch's rows. Ordered by size alone, the later one's rows are interleaved with the
  // earlier one's and the expert device idles through an attention per layer (`moert bench`,
  // 1 + 1 decode plans at r1 = 2: expert device idle 14 % of the run → 5 %).
  bool oldest_first_within_layer = true;
};

// The μ-queues of one expert device: token counts per (layer, local expert), and the arrival
// time of each queue's oldest token (meaningless when empty).
class queue_matrix {
public:
  queue_matrix(std::size_t num_layers, std::size_t num_experts)
      : num_layers_(num_layers), num_experts_(num_experts), tokens_(num_layers * num_experts),
        oldest_(num_layers * num_experts) {}

  std::size_t num_layers() const { return num_layers_; }
  std::size_t num_experts() const { return num_experts_; }
  std::size_t tokens(std::size_t layer, std::size_t expert) const { return tokens_[layer * num_experts_ + expert]; }
  std::chrono::nanoseconds oldest(std::size_t layer, std::size_t expert) const {
    return oldest_[layer * num_experts_ + expert];
  }
  void set(std::size_t layer, std::size_t expert, std::size_t tokens, std::chrono::nanoseconds oldest = {}) {
    tokens_[layer * num_experts_ + expert] = tokens;
    oldest_[layer * num_experts_ + expert] = oldest;
  }

private:
  std::size_t num_layers_;
  std::size_t num_experts_;
  std::vector<std::size_t> tokens_;
  std::vector<std::chrono::nanoseconds> oldest_;
};

struct queue_choice {
  std::size_t layer;
  std::size_t expert;
  bool urgent;  // chosen by the max_wait guard
  bool operator==(const queue_choice&) const = default;
};

// LS(b) = Σ_{k=1..K} δ^k · (tokens in layer (b+k) mod L) / num_experts.
double lookahead_score(const queue_matrix& queues, std::size_t layer, const defrag_params& params);

// The queue to drain whole, or nullopt when every queue is empty. Ties go to the lowest
// (layer, expert) index; empty queues are never chosen. With oldest_first_within_layer the
// best-scoring queue names the layer, and the oldest queue of that layer is chosen.
std::optional<queue_choice> pick_queue(const queue_matrix& queues, queue_policy policy,
                                       const defrag_params& params, std::chrono::nanoseconds now);

}  // namespace moert::policy
