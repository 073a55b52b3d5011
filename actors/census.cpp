#include "actors/census.hpp"

namespace moert::actors {

void actor_census::add(const caf::actor& actor, std::string name) {
  if (!actor)
    return;
  auto exited = std::make_shared<std::atomic<bool>>(false);
  // Runs at once when the actor has already exited; thread-safe (CAF's attach takes the
  // actor's lock).
  caf::actor_cast<caf::abstract_actor*>(actor)->attach_functor([exited] { exited->store(true); });
  std::lock_guard<std::mutex> guard{mutex_};
  entries_.push_back({caf::actor_cast<caf::weak_actor_ptr>(actor), std::move(name), std::move(exited)});
}

std::vector<std::string> actor_census::alive() const {
  std::lock_guard<std::mutex> guard{mutex_};
  std::vector<std::string> out;
  for (const entry& e : entries_)
    if (e.actor.lock())
      out.push_back(e.name);
  return out;
}

std::vector<std::string> actor_census::running() const {
  std::lock_guard<std::mutex> guard{mutex_};
  std::vector<std::string> out;
  for (const entry& e : entries_)
    if (!e.exited->load())
      out.push_back(e.name);
  return out;
}

void actor_census::kill_running() const {
  std::vector<caf::actor> targets;
  {
    std::lock_guard<std::mutex> guard{mutex_};
    for (const entry& e : entries_)
      if (auto strong = e.actor.lock(); strong && !e.exited->load())
        targets.push_back(caf::actor_cast<caf::actor>(strong));
  }
  for (const auto& actor : targets)
    caf::anon_send_exit(actor, caf::exit_reason::kill);
}

std::size_t actor_census::recorded() const {
  std::lock_guard<std::mutex> guard{mutex_};
  return entries_.size();
}

}  // namespace moert::actors
