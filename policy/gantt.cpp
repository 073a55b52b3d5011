#include "policy/gantt.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace moert::policy {

namespace {

constexpr const char* palette[] = {"#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1",
                                   "#76b7b2", "#edc948", "#ff9da7"};

std::string escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '<')
      out += "&lt;";
    else if (c == '>')
      out += "&gt;";
    else if (c == '&')
      out += "&amp;";
    else
      out += c;
  }
  return out;
}

std::string format(const char* fmt, auto... args) {
  char buf[512];
  std::snprintf(buf, sizeof buf, fmt, args...);
  return buf;
}

// A 1-2-5 step giving about ten ticks over `span`.
double tick_step(double span) {
  double raw = span / 10.0;
  double base = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0})
    if (m * base >= raw)
      return m * base;
  return 10.0 * base;
}

}  // namespace

std::string render_svg(const gantt_chart& chart, std::size_t max_bars) {
  constexpr double left = 110, top = 50, row_h = 30, plot_w = 1400, legend_h = 40;
  std::vector<const gantt_bar*> bars;
  for (const gantt_bar& b : chart.bars)
    bars.push_back(&b);
  std::stable_sort(bars.begin(), bars.end(), [](auto* a, auto* b) { return a->start < b->start; });
  std::string title = chart.title;
  if (bars.size() > max_bars) {
    title += format(" (first %zu of %zu tasks drawn)", max_bars, bars.size());
    bars.resize(max_bars);
  }
  double end = 0.0;
  for (const gantt_bar* b : bars)
    end = std::max(end, b->end);
  if (end <= 0.0)
    end = 1.0;
  double scale = plot_w / end;
  double height = top + row_h * double(chart.rows.size()) + 30 + legend_h;
  double width = left + plot_w + 30;

  std::string svg = format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" font-family=\"sans-serif\" "
      "font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
      width, height);
  svg += format("<text x=\"%.0f\" y=\"22\" font-size=\"15\">", left) + escape(title) + "</text>\n";
  for (std::size_t r = 0; r < chart.rows.size(); ++r) {
    double y = top + row_h * double(r);
    svg += format("<rect x=\"%.0f\" y=\"%.1f\" width=\"%.0f\" height=\"%.0f\" fill=\"%s\"/>\n", left, y, plot_w,
                  row_h, r % 2 ? "#f4f4f4" : "#fafafa");
    svg += format("<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">", left - 8, y + row_h / 2 + 4) +
           escape(chart.rows[r]) + "</text>\n";
  }
  double axis_y = top + row_h * double(chart.rows.size());
  double step = tick_step(end);
  for (double t = 0.0; t <= end * 1.0001; t += step) {
    double x = left + t * scale;
    svg += format("<line x1=\"%.1f\" y1=\"%.0f\" x2=\"%.1f\" y2=\"%.0f\" stroke=\"#ccc\"/>\n", x, top, x, axis_y + 4);
    svg += format("<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%g</text>\n", x, axis_y + 18, t);
  }
  svg += format("<text x=\"%.0f\" y=\"%.0f\">ms</text>\n", left + plot_w + 6, axis_y + 18);
  for (const gantt_bar* b : bars) {
    double x = left + b->start * scale;
    double w = std::max((b->end - b->start) * scale, 0.5);
    double y = top + row_h * double(b->row) + 3;
    svg += format("<rect x=\"%.2f\" y=\"%.1f\" width=\"%.2f\" height=\"%.0f\" fill=\"%s\" stroke=\"white\" "
                  "stroke-width=\"0.3\"><title>",
                  x, y, w, row_h - 6, palette[b->kind % std::size(palette)]) +
           escape(b->label) + format(" [%.4g, %.4g] ms", b->start, b->end) + "</title></rect>\n";
  }
  double lx = left, ly = axis_y + 30;
  for (std::size_t k = 0; k < chart.kinds.size(); ++k) {
    svg += format("<rect x=\"%.0f\" y=\"%.0f\" width=\"14\" height=\"14\" fill=\"%s\"/>\n", lx, ly,
                  palette[k % std::size(palette)]);
    svg += format("<text x=\"%.0f\" y=\"%.0f\">", lx + 18, ly + 12) + escape(chart.kinds[k]) + "</text>\n";
    lx += 30 + 8.0 * double(chart.kinds[k].size());
  }
  return svg + "</svg>\n";
}

gantt_chart make_gantt(const graph_report& report, std::string title) {
  gantt_chart chart{std::move(title), {"AG compute", "A2E link", "EG compute", "E2A link"},
                    {"attention", "shared expert", "A2E", "expert", "E2A"}, {}};
  for (const task_record& t : report.tasks)
    chart.bars.push_back({std::size_t(t.where), std::size_t(t.kind), t.start, t.end,
                          format("%s layer %u micro-batch %u chunk %u", std::string(to_string(t.kind)).c_str(),
                                 t.layer, t.micro_batch, t.chunk)});
  return chart;
}

gantt_chart make_gantt(const async_report& report, const async_config& config, std::string title) {
  gantt_chart chart{std::move(title), {}, {"attention", "expert"}, {}};
  for (std::size_t d = 0; d < config.num_attention_devices; ++d)
    chart.rows.push_back(format("attention %zu", d));
  for (std::size_t d = 0; d < config.num_expert_devices; ++d)
    chart.rows.push_back(format("expert %zu", d));
  for (const device_record& t : report.tasks)
    chart.bars.push_back({t.device, t.expert ? 1u : 0u, t.start, t.end,
                          format("%s layer %u, %u tokens", t.expert ? "expert" : "attention", t.layer, t.tokens)});
  return chart;
}

}  // namespace moert::policy
