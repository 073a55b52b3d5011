#pragma once

// Gantt charts of simulated schedules as standalone SVG text (open in a browser): one row per
// resource or device, one colour per task kind, a time axis in ms, a tooltip per bar.

#include "policy/simulator.hpp"

#include <cstddef>
#include <string>
#include <vector>

namespace moert::policy {

struct gantt_bar {
  std::size_t row = 0;
  std::size_t kind = 0;  // index into gantt_chart::kinds
  double start = 0.0;
  double end = 0.0;
  std::string label;     // tooltip
};

struct gantt_chart {
  std::string title;
  std::vector<std::string> rows;
  std::vector<std::string> kinds;
  std::vector<gantt_bar> bars;
};

// At most `max_bars` bars are drawn (the earliest); the title says when some were left out.
std::string render_svg(const gantt_chart& chart, std::size_t max_bars = 40000);

// Rows AG, A2E, EG, E2A; kinds attention, shared, A2E, expert, E2A. Needs record_tasks.
gantt_chart make_gantt(const graph_report& report, std::string title);

// One row per device (attention devices, then expert devices); kinds attention, expert.
gantt_chart make_gantt(const async_report& report, const async_config& config, std::string title);

}  // namespace moert::policy
