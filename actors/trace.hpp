#pragma once

// Records what ran where, for a Chrome/Perfetto trace (chrome://tracing, ui.perfetto.dev):
// one track per device, one slice per kernel task, flow arrows for A2E and E2A messages.
//
// Thread safety: every member may be called from any thread.

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace moert::actors {

class trace_recorder {
public:
  using time_point = std::chrono::steady_clock::time_point;

  void slice(const std::string& track, const std::string& name, time_point start, time_point end);
  // A flow arrow from (from_track, at sent) to (to_track, at received); `id` pairs them.
  void flow(const std::string& name, std::uint64_t id, const std::string& from_track, time_point sent,
            const std::string& to_track, time_point received);
  std::uint64_t next_flow_id();

  // The whole trace as Chrome trace-event JSON.
  std::string to_json() const;

private:
  struct event {
    char phase;  // 'X' slice, 's'/'f' flow start/finish
    std::string track;
    std::string name;
    time_point start;
    time_point end;
    std::uint64_t id;
  };
  mutable std::mutex mutex_;
  std::vector<event> events_;
  std::uint64_t next_flow_ = 1;
  time_point origin_ = std::chrono::steady_clock::now();
};

}  // namespace moert::actors
