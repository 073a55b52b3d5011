#pragma once

// The actors one engine spawned, kept as weak references with a name ("expert 3", "attention
// shard 0"), so that after shutdown the engine can say which of them still run or still exist
// (a strong reference kept somewhere, e.g. a cycle of handles): a leaked actor shows up as a
// number in EngineReport, with its name in the log, not as a hang (tests/fault/chaos asserts 0
// after every seed).
//
// Ownership: the engine (or node) owns it and outlives every actor it records. Thread safety:
// every member may be called from any thread (one mutex); weak references keep no actor alive.

#include <caf/all.hpp>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace moert::actors {

class actor_census {
public:
  // Records `actor` as spawned by the runtime; called at every spawn site (engine, supervisor).
  void add(const caf::actor& actor, std::string name);
  // Recorded actors whose object still exists (some strong reference holds it), by name.
  std::vector<std::string> alive() const;
  // Of those, the ones that have not terminated yet.
  std::vector<std::string> running() const;
  // Sends exit_reason::kill to every recorded actor still running (after a bounded wait gave
  // up), so that the actor system can be destroyed instead of waiting forever.
  void kill_running() const;
  std::size_t recorded() const;

private:
  struct entry {
    caf::weak_actor_ptr actor;
    std::string name;
    std::shared_ptr<std::atomic<bool>> exited;  // set by a functor attached to the actor
  };
  mutable std::mutex mutex_;
  std::vector<entry> entries_;
};

}  // namespace moert::actors
