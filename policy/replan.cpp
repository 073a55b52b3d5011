#include "policy/replan.hpp"

#include <cmath>

namespace moert::policy {

namespace {

bool moved(std::size_t now, std::size_t then, double threshold) {
  double base = std::max<double>(1.0, double(then));
  return std::fabs(double(now) - double(then)) / base > threshold;
}

}  // namespace

bool replan_trigger::observe(workload_shape observed) {
  if (observed.batch == 0)
    return false;  // nothing in flight: keep the plan for when work returns
  if (!anchor_)
    return true;
  bool outside = moved(observed.batch, anchor_->batch, params_.threshold) ||
                 moved(observed.seq_len, anchor_->seq_len, params_.threshold);
  moved_in_a_row_ = outside ? moved_in_a_row_ + 1 : 0;
  return moved_in_a_row_ >= params_.patience;
}

void replan_trigger::solved(workload_shape shape) {
  anchor_ = shape;
  moved_in_a_row_ = 0;
}

execution_plan to_execution_plan(const plan& solved) {
  return {solved.r1, solved.m_a, solved.pppipe ? 1 : solved.r2,
          solved.pppipe ? segment_order::pppipe : solved.order};
}

}  // namespace moert::policy
