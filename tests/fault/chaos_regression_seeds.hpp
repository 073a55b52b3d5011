#pragma once

// Chaos seeds that once failed (tests/fault/chaos.test.cpp runs them before its range, every
// run). When a seed fails, the suite prints "rerun: MOERT_CHAOS_SEED=<n> ..."; once the bug is
// fixed, add <n> here with a line saying what it caught. The seed alone decides the model,
// placement, plan and faults (chaos_config), so a number is the whole test.

#include <cstdint>
#include <vector>

// None has failed yet (seeds 0..2009 were scanned).
inline const std::vector<std::uint64_t> chaos_regression_seeds = {};
