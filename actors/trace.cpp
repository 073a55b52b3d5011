#include "actors/trace.hpp"

#include <iomanip>
#include <map>
#include <sstream>

namespace moert::actors {

void trace_recorder::slice(const std::string& track, const std::string& name, time_point start,
                           time_point end) {
  std::lock_guard<std::mutex> guard{mutex_};
  events_.push_back({'X', track, name, start, end, 0});
}

void trace_recorder::flow(const std::string& name, std::uint64_t id, const std::string& from_track,
                          time_point sent, const std::string& to_track, time_point received) {
  std::lock_guard<std::mutex> guard{mutex_};
  events_.push_back({'s', from_track, name, sent, sent, id});
  events_.push_back({'f', to_track, name, received, received, id});
}

std::uint64_t trace_recorder::next_flow_id() {
  std::lock_guard<std::mutex> guard{mutex_};
  return next_flow_++;
}

std::string trace_recorder::to_json() const {
  std::lock_guard<std::mutex> guard{mutex_};
  std::map<std::string, int> tids;
  for (const auto& e : events_)
    tids.emplace(e.track, 0);
  int next_tid = 1;
  for (auto& [track, tid] : tids)
    tid = next_tid++;
  auto micros = [&](time_point t) {
    return std::chrono::duration<double, std::micro>(t - origin_).count();
  };
  std::ostringstream out;
  // Fixed µs with ns digits: the default 6 significant digits round a trace longer than 1 s
  // to 10 µs, coarser than the hops it is read for.
  out << std::fixed << std::setprecision(3) << "{\"traceEvents\":[";
  bool first = true;
  auto sep = [&] {
    if (!first)
      out << ",";
    first = false;
  };
  for (const auto& [track, tid] : tids) {
    sep();
    out << R"({"ph":"M","name":"thread_name","pid":1,"tid":)" << tid << R"(,"args":{"name":")" << track << "\"}}";
  }
  for (const auto& e : events_) {
    sep();
    out << "{\"ph\":\"" << e.phase << "\",\"name\":\"" << e.name << "\",\"cat\":\"moert\",\"pid\":1,\"tid\":"
        << tids[e.track] << ",\"ts\":" << micros(e.start);
    if (e.phase == 'X')
      out << ",\"dur\":" << micros(e.end) - micros(e.start);
    else
      out << ",\"id\":" << e.id << (e.phase == 'f' ? ",\"bp\":\"e\"" : "");
    out << "}";
  }
  out << "]}\n";
  return out.str();
}

}  // namespace moert::actors
