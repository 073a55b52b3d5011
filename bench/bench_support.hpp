#pragma once

// What the benches share: summaries of repeated runs and the load they ran under.

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace moert::bench {

// The middle value (upper middle for an even count); 0 for none.
inline double median(std::vector<double> v) {
  if (v.empty())
    return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The highest value (`lowest`: the lowest, for times); 0 for none.
inline double best(const std::vector<double>& v, bool lowest = false) {
  if (v.empty())
    return 0;
  return lowest ? *std::min_element(v.begin(), v.end()) : *std::max_element(v.begin(), v.end());
}

// getloadavg's three figures, "?" when unavailable: printed beside every figure, because on a
// shared 2-core machine the load decides how much a figure means.
inline std::string load_average() {
  double load[3] = {0, 0, 0};
  if (::getloadavg(load, 3) != 3)
    return "?";
  char text[64];
  std::snprintf(text, sizeof text, "%.2f %.2f %.2f", load[0], load[1], load[2]);
  return text;
}

}  // namespace moert::bench
