#include "policy/plan.hpp"

namespace moert::policy {

std::string_view to_string(segment_order order) {
  switch (order) {
    case segment_order::aass:
      return "AASS";
    case segment_order::asas:
      return "ASAS";
    case segment_order::pppipe:
      return "PPPipe";
  }
  return "?";
}

std::optional<segment_order> parse_segment_order(std::string_view name) {
  for (auto order : {segment_order::aass, segment_order::asas, segment_order::pppipe}) {
    std::string_view canonical = to_string(order);
    if (name.size() == canonical.size()) {
      bool same = true;
      for (std::size_t i = 0; i < name.size(); ++i)
        same = same && (name[i] | 0x20) == (canonical[i] | 0x20);
      if (same)
        return order;
    }
  }
  return std::nullopt;
}

}  // namespace moert::policy
