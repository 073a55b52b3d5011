// Regression test: an engine used on one thread and destroyed on another must not hang.
// CAF 0.17 keeps a reference to the actor system's logger in a thread-local of every thread
// that spawns an actor or makes a scoped_actor (logger::set_current_actor_system), and
// ~actor_system waits until the logger's last reference is gone. Each public Engine call that
// did either on its caller's thread left that thread pinning the system, so ~Engine on any
// other thread waited until the caller's thread exited: forever, if the caller waits on it.
//
// Each scenario runs in a child process (forked before it builds anything) so a hang is a
// bounded failure: the parent kills the child after a deadline.
#include <catch2/catch.hpp>

#include "engine/engine.hpp"
#include "test_support.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

using namespace moert;

namespace {

const char* small_model = test::small_moe_model;

// Runs `call` on thread A, which then stays alive (as a client thread would) while the
// engine is destroyed on thread B; `create_on_a` also builds the engine on A. Returns the
// child's exit status: 0 done, 2 a call failed, killed by SIGKILL on a hang. No Catch macro
// runs in the child.
int run_scenario(bool create_on_a, std::function<bool(Engine&)> call, std::chrono::seconds limit) {
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    std::unique_ptr<Engine> engine;
    auto build = [&] {
      EngineConfig config;
      config.synthetic_config = small_model;
      auto made = Engine::create(config);
      if (made.ok())
        engine = std::move(*made);
    };
    if (!create_on_a) {
      // On a thread that ends at once: its thread-locals go with it, so only `call` is tested.
      std::thread c{build};
      c.join();
    }
    std::mutex m;
    std::condition_variable cv;
    bool called = false, ok = false, release = false;
    std::thread a{[&] {
      if (create_on_a)
        build();
      bool result = engine && call(*engine);
      std::unique_lock lock{m};
      called = true;
      ok = result;
      cv.notify_all();
      cv.wait(lock, [&] { return release; });
    }};
    {
      std::unique_lock lock{m};
      cv.wait(lock, [&] { return called; });
    }
    std::thread b{[&] { engine.reset(); }};
    b.join();  // hangs here without the fix; the parent's deadline ends it
    {
      std::lock_guard lock{m};
      release = true;
      cv.notify_all();
    }
    a.join();
    std::fflush(nullptr);
    ::_exit(ok ? 0 : 2);
  }
  auto deadline = std::chrono::steady_clock::now() + limit;
  int status = 0;
  while (::waitpid(pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return -2;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds{20});
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -3;
}

bool generate(Engine& engine, std::uint64_t id) {
  Request request;
  request.id = id;
  request.prompt = {1, 2, 3};
  request.max_new_tokens = 2;
  auto stream = engine.submit(request);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds{20};
  while (!stream->done()) {
    if (std::chrono::steady_clock::now() > deadline)
      return false;
    std::this_thread::sleep_for(std::chrono::milliseconds{1});
  }
  return stream->wait().ok();
}

constexpr std::chrono::seconds limit{15};

}  // namespace

// -2 is the parent's deadline: the engine's destruction on thread B hung.
TEST_CASE("an engine created on one thread is destroyed on another without hanging") {
  CHECK(run_scenario(true, [](Engine&) { return true; }, limit) == 0);
}

TEST_CASE("report() on one thread, ~Engine on another does not hang") {
  CHECK(run_scenario(false, [](Engine& e) { return e.report().errors == 0; }, limit) == 0);
}

TEST_CASE("submit() on one thread, ~Engine on another does not hang") {
  CHECK(run_scenario(false, [](Engine& e) { return generate(e, 1); }, limit) == 0);
}

TEST_CASE("cancel() on one thread, ~Engine on another does not hang") {
  CHECK(run_scenario(false, [](Engine& e) {
          Request request;
          request.id = 3;
          request.prompt = {1, 2, 3};
          request.max_new_tokens = 64;
          auto stream = e.submit(request);
          e.cancel(3);
          return true;
        }, limit) == 0);
}

TEST_CASE("kill_actor() on one thread, ~Engine on another does not hang") {
  CHECK(run_scenario(false, [](Engine& e) { return e.kill_actor("expert", 0).ok(); }, limit) == 0);
}

TEST_CASE("shutdown() on one thread, ~Engine on another does not hang") {
  CHECK(run_scenario(false, [](Engine& e) { e.shutdown(); return true; }, limit) == 0);
}
