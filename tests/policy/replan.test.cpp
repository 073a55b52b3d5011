#include <catch2/catch.hpp>

#include "policy/replan.hpp"

using namespace moert::policy;

TEST_CASE("the first observation solves; nothing in flight never does") {
  replan_trigger t;
  CHECK_FALSE(t.observe({0, 100}));
  CHECK(t.observe({8, 100}));
}

TEST_CASE("small drifts and one-step spikes keep the plan (hysteresis)") {
  replan_trigger t{{0.5, 2}};
  t.solved({16, 100});
  CHECK_FALSE(t.observe({20, 120}));  // inside the ±50 % band
  CHECK_FALSE(t.observe({40, 100}));  // outside once
  CHECK_FALSE(t.observe({16, 100}));  // back: the streak resets
  CHECK_FALSE(t.observe({40, 100}));
  CHECK(t.observe({40, 100}));        // outside twice in a row
  t.solved({40, 100});
  CHECK_FALSE(t.observe({40, 100}));
  CHECK_FALSE(t.observe({40, 400}));  // context length moves too
  CHECK(t.observe({40, 400}));
}

TEST_CASE("solver plans map to the runtime's plan") {
  plan p;
  p.m_a = 4;
  p.r1 = 3;
  p.r2 = 5;
  p.order = segment_order::aass;
  auto e = to_execution_plan(p);
  CHECK(e.m_a == 4);
  CHECK(e.r1 == 3);
  CHECK(e.r2 == 5);
  CHECK(e.order == segment_order::aass);
  p.pppipe = true;
  e = to_execution_plan(p);
  CHECK(e.order == segment_order::pppipe);
  CHECK(e.r2 == 1);
}
