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
  // Wider: the queue holding the device's oldest row goes first, whatever its layer (ties, as
  // all queues filled by one A2E are, go to the policy's score, then the lowest index). So the
  // micro-batch that fell behind finishes its layer first, and its next layer's rows reach the
  // device while the one ahead still has queues of that layer: they are drained together and
  // each expert's weights stream once for both. By the policy's layer choice, one micro-batch's
  // next layer (most rows) went before the other's last queues of the layer before; the
  // micro-batches drifted a layer apart and stayed there, each expert running once per
  // micro-batch (`moert bench`, 1 + 1 decode plans at r1 = 2: 55 expert runs per layer and
  // step against 32 at r1 = 1 when other processes preempted ours, 40-43 under chrt).
  // Implies oldest_first_within_layer. The max_wait guard, when it fires, still comes first.
  // It suits batches stepped in waves, as the engine's shards do (policy/simulator, waves: 300
  // expert runs against defrag's 470); with sequences staggered over the layers (AMoE's
  // setting) the layer scores fragment less (479 against 610), so the simulator's comparison
  // of the published policies turns it off.
  bool oldest_first = true;
};

// The μ-queues of one expert device: token counts per (layer, local expert), and the arrival
// time of each queue's oldest token (meaningless when empty).
class queue_matrix {
public:
  queue_matrix(std::size_t num_layers, std::size_t num_experts)
      : num_layers_(num_layers), num_experts_(num_experts), tokens_(num_layers * num_experts),
        oldest_(num_layers * num_experts), layer_tokens_(num_layers) {}

  std::size_t num_layers() const { return num_layers_; }
  std::size_t num_experts() const { return num_experts_; }
  std::size_t tokens(std::size_t layer, std::size_t expert) const { return tokens_[layer * num_experts_ + expert]; }
  std::chrono::nanoseconds oldest(std::size_t layer, std::size_t expert) const {
    return oldest_[layer * num_experts_ + expert];
  }
  // Σ over the layer's experts, kept up to date by set(): pick_queue reads it K times per layer.
  std::size_t layer_tokens(std::size_t layer) const { return layer_tokens_[layer]; }
  void set(std::size_t layer, std::size_t expert, std::size_t tokens, std::chrono::nanoseconds oldest = {}) {
    std::size_t& cell = tokens_[layer * num_experts_ + expert];
    layer_tokens_[layer] += tokens - cell;  // unsigned wrap-around cancels
    cell = tokens;
    oldest_[layer * num_experts_ + expert] = oldest;
  }

private:
  std::size_t num_layers_;
  std::size_t num_experts_;
  std::vector<std::size_t> tokens_;
  std::vector<std::chrono::nanoseconds> oldest_;
  std::vector<std::size_t> layer_tokens_;
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
// (layer, expert) index; empty queues are never chosen. With oldest_first the oldest queue is
// chosen, the best-scoring one among equally old; else with oldest_first_within_layer the
// best-scoring queue names the layer, and the oldest queue of that layer is chosen. Cost:
// O(layers × (experts + lookahead)) reads per call.
std::optional<queue_choice> pick_queue(const queue_matrix& queues, queue_policy policy,
                                       const defrag_params& params, std::chrono::nanoseconds now);

}  // namespace moert::policy
