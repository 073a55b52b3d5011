#include <catch2/catch.hpp>

#include "policy/defrag.hpp"

using namespace moert::policy;
using namespace std::chrono_literals;

namespace {

// amoe-eps.md §2.8 worked example: δ 0.8, K 7, 8 layers, 2 experts, Q[3] = [2, 1], Q[4] = [5, 4].
queue_matrix worked_example() {
  queue_matrix q{8, 2};
  q.set(3, 0, 2);
  q.set(3, 1, 1);
  q.set(4, 0, 5);
  q.set(4, 1, 4);
  return q;
}

defrag_params no_guard() {
  defrag_params p;
  p.max_wait = 0ns;
  return p;
}

}  // namespace

TEST_CASE("defrag scores match the worked example, including the wrap-around") {
  auto q = worked_example();
  auto p = no_guard();
  CHECK(lookahead_score(q, 3, p) == Approx(3.6));
  CHECK(lookahead_score(q, 4, p) == Approx(0.3146).epsilon(1e-3));  // wraps to layer 3
  CHECK(lookahead_score(q, 0, p) == Approx(2.6112));
  CHECK(lookahead_score(q, 5, p) == Approx(1.3369).epsilon(1e-3));
  CHECK(lookahead_score(q, 7, p) == Approx(2.089).epsilon(1e-3));
  CHECK(pick_queue(q, queue_policy::defrag, p, 0ns) == queue_choice{3, 0, false});
  CHECK(pick_queue(q, queue_policy::mtfs, p, 0ns) == queue_choice{4, 0, false});
  CHECK(pick_queue(q, queue_policy::flfs, p, 0ns) == queue_choice{3, 0, false});
}

TEST_CASE("empty queues are never picked; all empty gives nothing") {
  queue_matrix q{4, 3};
  CHECK_FALSE(pick_queue(q, queue_policy::defrag, no_guard(), 0ns).has_value());
  q.set(2, 2, 1);
  for (auto policy : {queue_policy::defrag, queue_policy::mtfs, queue_policy::flfs})
    CHECK(pick_queue(q, policy, no_guard(), 0ns) == queue_choice{2, 2, false});
}

TEST_CASE("ties go to the lowest (layer, expert) index") {
  queue_matrix q{2, 2};
  q.set(0, 1, 3);
  q.set(1, 0, 3);
  defrag_params p = no_guard();
  p.lookahead = 0;  // own tokens only: both score 3
  CHECK(pick_queue(q, queue_policy::defrag, p, 0ns) == queue_choice{0, 1, false});
  CHECK(pick_queue(q, queue_policy::mtfs, p, 0ns) == queue_choice{0, 1, false});
  q.set(0, 0, 3);
  CHECK(pick_queue(q, queue_policy::mtfs, p, 0ns) == queue_choice{0, 0, false});
}

TEST_CASE("the max_wait guard serves the oldest overdue queue first") {
  auto q = worked_example();
  q.set(3, 0, 2, 50ms);
  q.set(3, 1, 1, 10ms);
  q.set(4, 0, 5, 5ms);
  q.set(4, 1, 4, 90ms);
  defrag_params p;
  p.max_wait = 100ms;
  p.oldest_first = false;  // the scores alone (the next tests have the other cases)
  p.oldest_first_within_layer = false;
  CHECK(pick_queue(q, queue_policy::defrag, p, 100ms) == queue_choice{3, 0, false});  // none overdue
  CHECK(pick_queue(q, queue_policy::defrag, p, 111ms) == queue_choice{4, 0, true});   // (4,0) arrived at 5 ms
  CHECK(pick_queue(q, queue_policy::flfs, p, 200ms) == queue_choice{4, 0, true});
}

// Layer 0 holds micro-batch 0's rows (arrived at 10 ms) for experts 0 and 1, then micro-batch
// 1's (at 20 ms): expert 1's queue has both, expert 2's only micro-batch 1's, and the most.
// Micro-batch 0 needs experts 0 and 1 before its next attention; expert 2 can wait for it.
TEST_CASE("within the chosen layer, the queue holding the oldest rows goes first") {
  queue_matrix q{2, 3};
  q.set(0, 0, 2, 10ms);
  q.set(0, 1, 3, 10ms);
  q.set(0, 2, 5, 20ms);
  q.set(1, 0, 1, 30ms);
  defrag_params p = no_guard();
  REQUIRE(p.oldest_first_within_layer);  // the default
  p.oldest_first = false;                // the narrower rule alone
  for (auto policy : {queue_policy::defrag, queue_policy::mtfs})
    CHECK(pick_queue(q, policy, p, 40ms) == queue_choice{0, 1, false});  // oldest, then most tokens
  CHECK(pick_queue(q, queue_policy::flfs, p, 40ms) == queue_choice{0, 0, false});  // oldest, then lowest index
  q.set(0, 1, 0);  // drained: expert 0 still holds micro-batch 0's rows
  CHECK(pick_queue(q, queue_policy::mtfs, p, 40ms) == queue_choice{0, 0, false});
  // By the scores alone the later micro-batch's larger queue would go before micro-batch 0's.
  p.oldest_first_within_layer = false;
  CHECK(pick_queue(q, queue_policy::mtfs, p, 40ms) == queue_choice{0, 2, false});
  CHECK(pick_queue(q, queue_policy::defrag, p, 40ms) == queue_choice{0, 2, false});
}

// Decode at r1 = 2, the micro-batches a layer apart: micro-batch 1's last queues of layer 2
// (arrived at 10 ms) and micro-batch 0's rows of layer 3 (at 20 ms, more of them). Micro-batch 1
// must finish layer 2 first, so that its layer-3 rows reach the device while micro-batch 0's
// still wait and both are drained together.
TEST_CASE("the queue holding the device's oldest row goes first, whatever its layer") {
  queue_matrix q{8, 3};
  q.set(2, 1, 1, 10ms);
  q.set(3, 0, 4, 20ms);
  q.set(3, 1, 5, 20ms);
  q.set(3, 2, 3, 20ms);
  defrag_params p = no_guard();
  REQUIRE(p.oldest_first);  // the default
  for (auto policy : {queue_policy::defrag, queue_policy::mtfs, queue_policy::flfs})
    CHECK(pick_queue(q, policy, p, 30ms) == queue_choice{2, 1, false});
  q.set(2, 1, 0);  // drained: among the equally old, the policy's score, then the lowest index
  CHECK(pick_queue(q, queue_policy::mtfs, p, 30ms) == queue_choice{3, 1, false});
  CHECK(pick_queue(q, queue_policy::defrag, p, 30ms) == queue_choice{3, 1, false});
  CHECK(pick_queue(q, queue_policy::flfs, p, 30ms) == queue_choice{3, 0, false});
  // Across the step boundary: layer 7's rows are older than the next step's layer 0.
  q.set(0, 2, 6, 25ms);
  q.set(7, 0, 1, 15ms);
  CHECK(pick_queue(q, queue_policy::flfs, p, 30ms) == queue_choice{7, 0, false});
  // The guard still comes first: layer 0's queue has waited past max_wait.
  p.max_wait = 100ms;
  q.set(0, 2, 6, 1ms);
  q.set(7, 0, 1, 5ms);
  CHECK(pick_queue(q, queue_policy::mtfs, p, 104ms) == queue_choice{0, 2, true});
  // Without it, the policy names the layer: defrag and MTFS take layer 3 (more rows) before
  // micro-batch 1's last queue of layer 2.
  q = queue_matrix{8, 3};
  q.set(2, 1, 1, 10ms);
  q.set(3, 0, 4, 20ms);
  q.set(3, 1, 5, 20ms);
  p = no_guard();
  p.oldest_first = false;
  CHECK(pick_queue(q, queue_policy::mtfs, p, 30ms) == queue_choice{3, 1, false});
  CHECK(pick_queue(q, queue_policy::defrag, p, 30ms) == queue_choice{3, 1, false});
}

TEST_CASE("a queue matrix keeps each layer's token total as queues fill and drain") {
  queue_matrix q{3, 4};
  q.set(1, 0, 5);
  q.set(1, 3, 2);
  q.set(1, 0, 7);
  q.set(2, 1, 1);
  CHECK(q.layer_tokens(0) == 0);
  CHECK(q.layer_tokens(1) == 9);
  CHECK(q.layer_tokens(2) == 1);
  q.set(1, 0, 0);
  q.set(1, 3, 0);
  CHECK(q.layer_tokens(1) == 0);
}

TEST_CASE("policy names parse") {
  CHECK(parse_queue_policy("defrag") == queue_policy::defrag);
  CHECK(parse_queue_policy("MTFS") == queue_policy::mtfs);
  CHECK_FALSE(parse_queue_policy("lifo").has_value());
}
