// The tensor path between two processes: moert's UCX channel (transport/ucx_channel) against
// ucx_perftest on the same machine, same transport and sizes, in one run.
//
//   build/bench/moert_bench_transport [--transport tcp|posix|both] [--reps N] [--pattern polled|callback|both]
//                                     [--sizes 4096,65536,1048576] [--receive-buffers N] [--eager-limit BYTES]
//
// Latency is one-way (half the ping-pong round trip, p50 over the iterations, one buffer each
// way: perftest's tag_lat). Bandwidth streams messages with `window` (32, perftest's tag_bw
// default) sends in flight from one send buffer and `window` receives posted, and is counted
// from the first send to the receiver's acknowledgement of the last message (perftest: from
// the first send to its final flush). Two patterns of moert's channel are measured:
//   polled:   each process's own thread busy-polls UCX (ucx_channel::poll) with its receives
//             posted ahead of the bytes, as ucx_perftest's tag_lat / tag_bw do: the channel's
//             own cost, like for like with perftest (the channel thread steps aside while a
//             caller polls). By default every receive of the stream lands in one buffer, as in
//             tag_bw; --receive-buffers 32 gives each receive in flight its own, as the
//             engine's pooled row blocks would. The engine never busy-polls: this is not its path.
//   callback: completions run on the channel thread and are handed to a thread that sleeps on
//             a future (receive into a pool buffer): two thread wake-ups per message on top of
//             UCX. The closest to the engine's path (tensor_link::fetch_bytes: a receive that
//             must wait completes on the channel thread, which wakes a CAF worker), which is
//             not measured here apart from the CAF hop; a small message whose bytes are already
//             there when receive_into is called completes inside that call instead.
// Neither includes the CAF descriptor hop (88-300 us between processes, platform.md §2.5):
// moert_bench_cluster measures the whole path. Each repetition runs, size by size, moert's pair
// of processes and ucx_perftest's back to back (ours first in even repetitions, perftest first
// in odd ones: ABBA, so a drifting load favours neither), so both see the same moment's load.
// The table gives the median and the best of the repetitions, the ratio of the medians and of
// the bests, and the median of the per-pair ratios (each repetition's ours / perftest at that
// size): perftest alone swings 2.5-3.5x between runs on a shared 2-core VM, and the per-pair
// median cancels most of that swing (the load average is printed before and after).

#include "bench/bench_support.hpp"
#include "transport/ucx_channel.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <mutex>
#include <string>
#include <vector>

using namespace moert;
using namespace moert::transport;
using moert::bench::best;
using moert::bench::load_average;
using moert::bench::median;
using clock_type = std::chrono::steady_clock;

namespace {

constexpr std::uint64_t done_tag = ~std::uint64_t{0};

bool write_all(int fd, const void* data, std::size_t size) {
  auto* bytes = static_cast<const char*>(data);
  while (size > 0) {
    auto written = ::write(fd, bytes, size);
    if (written <= 0)
      return false;
    bytes += written;
    size -= static_cast<std::size_t>(written);
  }
  return true;
}
bool read_all(int fd, void* data, std::size_t size) {
  auto* bytes = static_cast<char*>(data);
  while (size > 0) {
    auto got = ::read(fd, bytes, size);
    if (got <= 0)
      return false;
    bytes += got;
    size -= static_cast<std::size_t>(got);
  }
  return true;
}
void send_string(int fd, const std::string& s) {
  std::uint32_t size = static_cast<std::uint32_t>(s.size());
  write_all(fd, &size, sizeof size);
  write_all(fd, s.data(), s.size());
}
std::string receive_string(int fd) {
  std::uint32_t size = 0;
  if (!read_all(fd, &size, sizeof size) || size > (1u << 20))
    return {};
  std::string s(size, '\0');
  read_all(fd, s.data(), size);
  return s;
}

// Blocking helpers over the asynchronous channel (fine in a benchmark's main thread).
status send_and_wait(ucx_channel& channel, peer_id peer, std::uint64_t tag,
                     const std::shared_ptr<const std::vector<std::uint8_t>>& bytes) {
  std::promise<status> done;
  auto future = done.get_future();
  channel.send(peer, tag, bytes, [&](status s) { done.set_value(std::move(s)); });
  return future.get();
}
result<received_buffer> receive_and_wait(ucx_channel& channel, peer_id peer, std::uint64_t tag, std::size_t bytes) {
  std::promise<result<received_buffer>> done;
  auto future = done.get_future();
  channel.receive(peer, tag, bytes, [&](result<received_buffer> r) { done.set_value(std::move(r)); });
  return future.get();
}

struct plan {
  std::size_t bytes;
  std::size_t latency_iterations;
  std::size_t bandwidth_messages;
};
// 1 MiB streams 4000 messages (4 GiB, about 0.4 s at 10 GiB/s): with 600, a run lasted ~60 ms and
// perftest's own figure moved 2.0-17.4 GB/s between back-to-back runs on a quiet 2-core VM, too short
// a window to say whether ours reaches 0.8 of it. Both sides stream the same count.
constexpr std::array<plan, 3> all_plans{{{4096, 2000, 4000}, {65536, 1000, 2000}, {1 << 20, 300, 4000}}};
// ucx_perftest's tag_bw window (its default -O for that test): sends in flight at the sender,
// receives posted at the receiver.
constexpr std::size_t window = 32;

// What a run measures (set from the command line before the fork: the echo sees the same).
struct run_options {
  std::vector<plan> plans{all_plans.begin(), all_plans.end()};
  // Distinct buffers the polled stream's receives land in, in turn. 1 is perftest's tag_bw
  // (every receive of the stream into one buffer, which stays in the cache); `window` gives
  // every receive in flight its own, like the engine's pooled row blocks.
  std::size_t receive_buffers = 1;
  // ucx_channel_config::eager_limit_bytes of both channels (UCX's RNDV_THRESH).
  std::size_t eager_limit = ucx_channel_config{}.eager_limit_bytes;
};
run_options options;

// Which of the two patterns (see the top of this file) a run measures.
struct patterns {
  bool callback = true;
  bool polled = true;
};

using byte_buffer = std::shared_ptr<std::vector<std::uint8_t>>;

// Receives `dest->size()` bytes for `tag` into `dest`, driving the channel from this thread
// until they are here (the channel's deadline ends every receive, so this ends too).
bool polled_receive(ucx_channel& channel, peer_id peer, std::uint64_t tag, const byte_buffer& dest,
                    std::chrono::milliseconds timeout = std::chrono::milliseconds{0}) {
  auto flag = std::make_shared<std::atomic<int>>(0);  // 0 pending, 1 received, 2 failed
  auto now = channel.receive_into(
      peer, tag, dest->data(), dest->size(), dest, [flag](status s) { flag->store(s.ok() ? 1 : 2); }, timeout);
  if (!now.ok())
    return false;
  if (*now)
    return true;
  while (flag->load(std::memory_order_acquire) == 0)
    channel.poll();
  return flag->load() == 1;
}

int echo_failed(const char* what, const plan& p, std::size_t at) {
  std::fprintf(stderr, "echo: %s failed at %zu bytes (%zu)\n", what, p.bytes, at);
  return 1;
}

// The echo side of the polled pattern: receives each latency message into one of two buffers
// of its own and sends it back from there; receives the stream with `window` receives posted
// (into options.receive_buffers buffers in turn).
int echo_polled(ucx_channel& channel, peer_id parent, const plan& p, std::uint64_t& tag) {
  std::array<byte_buffer, 2> buffers{std::make_shared<std::vector<std::uint8_t>>(p.bytes),
                                     std::make_shared<std::vector<std::uint8_t>>(p.bytes)};
  for (std::size_t i = 0; i < p.latency_iterations; ++i, ++tag) {
    const auto& buffer = buffers[i % 2];
    if (!polled_receive(channel, parent, tag, buffer))
      return echo_failed("polled latency receive", p, i);
    channel.send(parent, tag, buffer->data(), buffer->size(), buffer, {});
  }
  std::size_t slots = window;
  std::vector<byte_buffer> ring;
  std::vector<std::shared_ptr<std::atomic<int>>> flags(slots);
  for (std::size_t i = 0; i < options.receive_buffers; ++i)  // main() checks it is ≥ 1
    ring.push_back(std::make_shared<std::vector<std::uint8_t>>(p.bytes));
  std::uint64_t first = tag;
  auto post = [&](std::size_t k) {
    auto flag = std::make_shared<std::atomic<int>>(0);
    flags[k % slots] = flag;
    const auto& buffer = ring[k % ring.size()];
    auto now = channel.receive_into(parent, first + k, buffer->data(), p.bytes, buffer,
                                    [flag](status s) { flag->store(s.ok() ? 1 : 2); });
    if (!now.ok() || *now)
      flag->store(now.ok() ? 1 : 2);
  };
  std::size_t posted = 0, failed = 0;
  for (; posted < std::min(slots, p.bandwidth_messages); ++posted)
    post(posted);
  for (std::size_t done = 0; done < p.bandwidth_messages;) {
    int state = flags[done % slots]->load(std::memory_order_acquire);
    if (state == 0) {
      channel.poll();
      continue;
    }
    failed += state == 2 ? 1 : 0;
    ++done;
    if (posted < p.bandwidth_messages)
      post(posted++);
  }
  tag += p.bandwidth_messages;
  if (failed)
    return echo_failed("polled stream receives", p, failed);
  auto ack = std::make_shared<const std::vector<std::uint8_t>>(1, 1);
  channel.send(parent, done_tag, ack->data(), ack->size(), ack, {});
  return 0;
}

// The echo side of the callback pattern: mirrors every latency message, swallows the stream.
int echo_callback(ucx_channel& channel, peer_id parent, const plan& p, std::uint64_t& tag) {
  for (std::size_t i = 0; i < p.latency_iterations; ++i, ++tag) {
    auto got = receive_and_wait(channel, parent, tag, p.bytes);
    if (!got.ok())
      return echo_failed(("callback latency receive: " + got.err().message).c_str(), p, i);
    // Echo from the received pool buffer itself: no copy.
    std::promise<status> sent;
    auto echoed = sent.get_future();
    channel.send(parent, tag, got->data(), got->size(), got->storage(), [&](status s) { sent.set_value(std::move(s)); });
    if (!echoed.get().ok())
      return echo_failed("callback latency echo", p, i);
  }
  // Keep `window` receives posted ahead of the stream.
  std::mutex mutex;
  std::condition_variable changed;
  std::size_t received = 0, failed = 0;
  std::string first_failure;
  std::size_t posted = 0;
  std::uint64_t first = tag;
  auto post = [&](std::uint64_t t) {
    channel.receive(parent, t, p.bytes, [&](result<received_buffer> r) {
      std::lock_guard<std::mutex> guard{mutex};
      ++received;
      if (!r.ok() && failed++ == 0)
        first_failure = r.err().message;
      changed.notify_all();
    });
  };
  for (; posted < std::min(window, p.bandwidth_messages); ++posted)
    post(first + posted);
  {
    std::unique_lock<std::mutex> lock{mutex};
    while (received < p.bandwidth_messages) {
      // Post first, then wait: the receives posted so far may all have completed already
      // (waiting for a change then was the stall seen at 64 KiB: 32 posted, 32 received).
      while (posted < p.bandwidth_messages && posted < received + window) {
        lock.unlock();
        post(first + posted++);
        lock.lock();
      }
      if (received >= p.bandwidth_messages)
        break;
      std::size_t seen = received;
      if (!changed.wait_for(lock, std::chrono::seconds{30}, [&] { return received != seen; }))
        return echo_failed("callback stream stalled", p, received);
    }
  }
  tag += p.bandwidth_messages;
  if (failed)
    return echo_failed(("callback stream receives: " + first_failure).c_str(), p, failed);
  auto ack = std::make_shared<const std::vector<std::uint8_t>>(1, 1);
  return send_and_wait(channel, parent, done_tag, ack).ok() ? 0 : 1;
}

int run_echo(ucx_transport transport, patterns which, const std::vector<plan>& plans, int to_parent,
             int from_parent) {
  auto made = ucx_channel::create(
      {.transport = transport, .pool_bytes = std::size_t{64} << 20, .eager_limit_bytes = options.eager_limit});
  if (!made.ok()) {
    std::fprintf(stderr, "echo: %s\n", made.err().what().c_str());
    return 1;
  }
  auto& channel = **made;
  send_string(to_parent, channel.address());
  auto parent = channel.connect(receive_string(from_parent));
  if (!parent.ok())
    return 1;
  std::uint64_t tag = 0;
  for (const auto& p : plans) {
    if (which.callback && echo_callback(channel, *parent, p, tag) != 0)
      return 1;
    if (which.polled && echo_polled(channel, *parent, p, tag) != 0)
      return 1;
  }
  return 0;
}

struct figures {
  double latency_us = 0;     // one-way, p50
  double bandwidth_mib = 0;  // MiB/s
};
struct size_figures {
  figures callback, polled;
};

bool report_mismatch(const received_buffer& got, const std::vector<std::uint8_t>& payload, std::size_t i) {
  if (std::equal(got.bytes().begin(), got.bytes().end(), payload.begin(), payload.end()))
    return false;
  std::fprintf(stderr, "latency: echo differs at %zu bytes, iteration %zu\n", payload.size(), i);
  return true;
}

// The driver's half of the callback pattern; false when the echo failed (the sides are out of
// step then).
bool drive_callback(ucx_channel& channel, peer_id echo, const plan& p, const byte_buffer& payload, std::uint64_t& tag,
                    figures& f) {
  std::vector<double> one_way;
  for (std::size_t i = 0; i < p.latency_iterations; ++i, ++tag) {
    auto start = clock_type::now();
    std::promise<result<received_buffer>> back;
    auto future = back.get_future();
    channel.receive(echo, tag, p.bytes, [&](result<received_buffer> r) { back.set_value(std::move(r)); });
    (void)send_and_wait(channel, echo, tag, payload);
    auto got = future.get();
    auto rtt = std::chrono::duration<double, std::micro>(clock_type::now() - start).count();
    if (!got.ok()) {
      std::fprintf(stderr, "latency (callback): %s at %zu bytes, iteration %zu\n", got.err().message.c_str(), p.bytes, i);
      return false;
    }
    if (report_mismatch(*got, *payload, i))
      return false;
    one_way.push_back(rtt / 2);
  }
  std::sort(one_way.begin(), one_way.end());
  f.latency_us = one_way.empty() ? 0 : one_way[one_way.size() / 2];

  std::promise<result<received_buffer>> acked;
  auto ack = acked.get_future();
  channel.receive(echo, done_tag, 1, [&](result<received_buffer> r) { acked.set_value(std::move(r)); },
                  std::chrono::milliseconds{60000});
  std::mutex mutex;
  std::condition_variable changed;
  std::size_t in_flight = 0;
  auto start = clock_type::now();
  for (std::size_t i = 0; i < p.bandwidth_messages; ++i) {
    {
      std::unique_lock<std::mutex> lock{mutex};
      changed.wait(lock, [&] { return in_flight < window; });
      ++in_flight;
    }
    channel.send(echo, tag + i, payload, [&](status) {
      std::lock_guard<std::mutex> guard{mutex};
      --in_flight;
      changed.notify_all();
    });
  }
  auto done = ack.get();
  auto seconds = std::chrono::duration<double>(clock_type::now() - start).count();
  {
    // The send callbacks use `mutex` and `in_flight`: all of them before they go.
    std::unique_lock<std::mutex> lock{mutex};
    changed.wait_for(lock, std::chrono::seconds{10}, [&] { return in_flight == 0; });
  }
  tag += p.bandwidth_messages;
  if (done.ok())
    f.bandwidth_mib = static_cast<double>(p.bytes) * p.bandwidth_messages / seconds / (1 << 20);
  return true;
}

// The driver's half of the polled pattern.
bool drive_polled(ucx_channel& channel, peer_id echo, const plan& p, const byte_buffer& payload, std::uint64_t& tag,
                  figures& f) {
  auto back = std::make_shared<std::vector<std::uint8_t>>(p.bytes);
  std::vector<double> one_way;
  for (std::size_t i = 0; i < p.latency_iterations; ++i, ++tag) {
    auto start = clock_type::now();
    auto flag = std::make_shared<std::atomic<int>>(0);
    auto now = channel.receive_into(echo, tag, back->data(), p.bytes, back,
                                    [flag](status s) { flag->store(s.ok() ? 1 : 2); });
    channel.send(echo, tag, payload->data(), payload->size(), payload, {});
    bool ok = now.ok();
    if (ok && !*now) {
      while (flag->load(std::memory_order_acquire) == 0)
        channel.poll();
      ok = flag->load() == 1;
    }
    auto rtt = std::chrono::duration<double, std::micro>(clock_type::now() - start).count();
    if (!ok || *back != *payload) {
      std::fprintf(stderr, "latency (polled): echo %s at %zu bytes, iteration %zu\n", ok ? "differs" : "failed",
                   p.bytes, i);
      return false;
    }
    one_way.push_back(rtt / 2);
  }
  std::sort(one_way.begin(), one_way.end());
  f.latency_us = one_way.empty() ? 0 : one_way[one_way.size() / 2];

  auto ack = std::make_shared<std::vector<std::uint8_t>>(1);
  auto acked = std::make_shared<std::atomic<int>>(0);
  auto posted = channel.receive_into(echo, done_tag, ack->data(), 1, ack,
                                     [acked](status s) { acked->store(s.ok() ? 1 : 2); }, std::chrono::milliseconds{60000});
  if (!posted.ok())
    return false;
  if (*posted)
    acked->store(1);
  auto in_flight = std::make_shared<std::atomic<std::size_t>>(0);
  auto start = clock_type::now();
  for (std::size_t i = 0; i < p.bandwidth_messages; ++i) {
    while (in_flight->load(std::memory_order_acquire) >= window)
      channel.poll();
    in_flight->fetch_add(1);
    channel.send(echo, tag + i, payload->data(), payload->size(), payload, [in_flight](status) { in_flight->fetch_sub(1); });
  }
  while (acked->load(std::memory_order_acquire) == 0)
    channel.poll();
  auto seconds = std::chrono::duration<double>(clock_type::now() - start).count();
  while (in_flight->load(std::memory_order_acquire) != 0)  // every send has a deadline
    channel.poll();
  tag += p.bandwidth_messages;
  if (acked->load() == 1)
    f.bandwidth_mib = static_cast<double>(p.bytes) * p.bandwidth_messages / seconds / (1 << 20);
  return true;
}

std::vector<size_figures> run_driver(ucx_transport transport, patterns which, const std::vector<plan>& plans) {
  int up[2], down[2];
  if (::pipe(up) != 0 || ::pipe(down) != 0)
    return {};
  pid_t child = ::fork();
  if (child == 0) {
    ::close(up[0]);
    ::close(down[1]);
    ::_exit(run_echo(transport, which, plans, up[1], down[0]));
  }
  ::close(up[1]);
  ::close(down[0]);
  std::vector<size_figures> out;
  auto made = ucx_channel::create(
      {.transport = transport, .pool_bytes = std::size_t{64} << 20, .eager_limit_bytes = options.eager_limit});
  if (made.ok()) {
    auto& channel = **made;
    auto echo = channel.connect(receive_string(up[0]));
    send_string(down[1], channel.address());
    std::uint64_t tag = 0;
    for (const auto& p : plans) {
      auto payload = std::make_shared<std::vector<std::uint8_t>>(p.bytes);
      for (std::size_t i = 0; i < p.bytes; ++i)
        (*payload)[i] = static_cast<std::uint8_t>(i * 7);
      size_figures f;
      bool ok = echo.ok() && (!which.callback || drive_callback(channel, *echo, p, payload, tag, f.callback)) &&
                (!which.polled || drive_polled(channel, *echo, p, payload, tag, f.polled));
      if (!ok) {
        ::kill(child, SIGKILL);  // the two sides are out of step now
        ::waitpid(child, nullptr, 0);
        return out;
      }
      out.push_back(f);
    }
  }
  int child_status = 0;
  ::waitpid(child, &child_status, 0);
  return out;
}

// ucx_perftest's "Final:" line: iterations, p50, average, overall (µs), then MB/s average,
// overall, then messages/s.
std::vector<double> perftest_final(const std::string& test, ucx_transport transport, std::size_t bytes,
                                   std::size_t iterations, int port) {
  const char* tls = transport == ucx_transport::tcp ? "tcp" : "posix";
  std::string server = "UCX_TLS=" + std::string(tls) + " timeout 60 ucx_perftest -p " + std::to_string(port) +
                       " >/dev/null 2>&1 &";
  if (std::system(server.c_str()) != 0)
    return {};
  ::usleep(300000);
  std::string client = "UCX_TLS=" + std::string(tls) + " timeout 60 ucx_perftest 127.0.0.1 -p " + std::to_string(port) +
                       " -t " + test + " -s " + std::to_string(bytes) + " -n " + std::to_string(iterations) +
                       " -w " + std::to_string(iterations / 10) + " 2>/dev/null";
  std::vector<double> values;
  if (FILE* pipe = ::popen(client.c_str(), "r")) {
    char line[512];
    while (std::fgets(line, sizeof line, pipe))
      if (std::strncmp(line, "Final:", 6) == 0) {
        char* cursor = line + 6;
        while (*cursor) {
          char* end = nullptr;
          double v = std::strtod(cursor, &end);
          if (end == cursor)
            break;
          values.push_back(v);
          cursor = end;
        }
      }
    ::pclose(pipe);
  }
  return values;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<ucx_transport> transports{ucx_transport::posix, ucx_transport::tcp};
  std::size_t reps = 5;
  patterns which;
  std::string pattern_arg = "both";
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--transport" && i + 1 < argc) {
      std::string value = argv[++i];
      if (value == "tcp")
        transports = {ucx_transport::tcp};
      else if (value == "posix")
        transports = {ucx_transport::posix};
      else if (value != "both") {
        std::fprintf(stderr, "--transport '%s': expected tcp, posix or both\n", value.c_str());
        return 2;
      }
    } else if (arg == "--pattern" && i + 1 < argc) {
      pattern_arg = argv[++i];
      if (pattern_arg == "polled")
        which.callback = false;
      else if (pattern_arg == "callback")
        which.polled = false;
      else if (pattern_arg != "both") {
        std::fprintf(stderr, "--pattern '%s': expected polled, callback or both\n", pattern_arg.c_str());
        return 2;
      }
    } else if (arg == "--sizes" && i + 1 < argc) {
      std::string list = argv[++i];
      options.plans.clear();
      for (std::size_t at = 0; at <= list.size();) {
        auto comma = std::min(list.find(',', at), list.size());
        std::size_t bytes = std::strtoul(list.substr(at, comma - at).c_str(), nullptr, 10);
        auto found = std::find_if(all_plans.begin(), all_plans.end(), [&](const plan& p) { return p.bytes == bytes; });
        if (found == all_plans.end()) {
          std::fprintf(stderr, "--sizes: '%s' is not one of 4096, 65536, 1048576\n", list.substr(at, comma - at).c_str());
          return 2;
        }
        options.plans.push_back(*found);
        at = comma + 1;
      }
    } else if (arg == "--receive-buffers" && i + 1 < argc) {
      options.receive_buffers = std::strtoul(argv[++i], nullptr, 10);
      if (options.receive_buffers < 1 || options.receive_buffers > window) {
        std::fprintf(stderr, "--receive-buffers: expected 1 to %zu\n", window);
        return 2;
      }
    } else if (arg == "--eager-limit" && i + 1 < argc) {
      options.eager_limit = std::strtoul(argv[++i], nullptr, 10);
      if (options.eager_limit == 0) {
        std::fprintf(stderr, "--eager-limit: expected a byte count above 0\n");
        return 2;
      }
    } else if (arg == "--reps" && i + 1 < argc) {
      reps = std::max<std::size_t>(1, std::strtoul(argv[++i], nullptr, 10));
    } else if (arg == "--help" || arg == "-h") {
      std::printf("usage: %s [--transport tcp|posix|both] [--reps N] [--pattern polled|callback|both] "
                  "[--sizes 4096,65536,1048576] [--receive-buffers 1..%zu] [--eager-limit BYTES]\n",
                  argv[0], window);
      return 0;
    } else {
      std::fprintf(stderr, "unknown option %s (see --help)\n", arg.c_str());
      return 2;
    }
  }
  std::printf("moert transport bench: moert's UCX channel between two processes vs ucx_perftest, %zu repetitions "
              "(median / best), bandwidth window %zu\n",
              reps, window);
  std::printf("moert's channel: UCX_TLS=<transport>, RNDV_THRESH=%zu (eager below), PROTO_ENABLE=y; ucx_perftest: "
              "UCX_TLS=<transport>, UCX's defaults, tag_lat / tag_bw, one busy-polling thread per process\n",
              options.eager_limit);
  std::printf("polled: one thread per process busy-polls UCX, receives posted ahead, the stream's receives into %zu "
              "buffer(s) (perftest's pattern with 1, not the engine's); callback: completion on the channel thread, "
              "handed to a sleeping thread (the closest to the engine's tensor path). Neither includes the CAF "
              "descriptor hop.\n",
              options.receive_buffers);
  std::printf("load average before: %s\n", load_average().c_str());
  std::printf("%-10s %8s %-8s | %17s %17s | %19s %19s | %5s %5s %11s\n", "transport", "bytes", "pattern",
              "lat moert", "lat perftest", "bw moert", "bw perftest", "ratio", "ratio", "pair ratio");
  std::printf("%-10s %8s %-8s | %17s %17s | %19s %19s | %5s %5s %11s\n", "", "", "", "us one-way med/bst",
              "us one-way med/bst", "MiB/s med/best", "MiB/s med/best", "med", "best", "med (n)");
  int port = 13400 + static_cast<int>(::getpid() % 500) * 8;
  for (auto transport : transports) {
    struct samples {
      std::vector<double> latency, bandwidth;
    };
    std::size_t sizes = options.plans.size();
    std::vector<samples> callback(sizes), polled(sizes), theirs(sizes);
    // Bandwidth ratios of the pairs run back to back: ours / perftest, per size and pattern.
    std::vector<std::vector<double>> callback_pairs(sizes), polled_pairs(sizes);
    for (std::size_t r = 0; r < reps; ++r) {
      for (std::size_t i = 0; i < sizes; ++i) {
        const auto& p = options.plans[i];
        std::vector<size_figures> ours;
        std::vector<double> lat, bw;
        auto run_ours = [&] { ours = run_driver(transport, which, {p}); };
        auto run_theirs = [&] {
          lat = perftest_final("tag_lat", transport, p.bytes, p.latency_iterations, port++);
          bw = perftest_final("tag_bw", transport, p.bytes, p.bandwidth_messages, port++);
          if (port > 60000)
            port = 13400;
        };
        if (r % 2 == 0) {
          run_ours();
          run_theirs();
        } else {
          run_theirs();
          run_ours();
        }
        if (!ours.empty()) {
          callback[i].latency.push_back(ours[0].callback.latency_us);
          callback[i].bandwidth.push_back(ours[0].callback.bandwidth_mib);
          polled[i].latency.push_back(ours[0].polled.latency_us);
          polled[i].bandwidth.push_back(ours[0].polled.bandwidth_mib);
        }
        if (lat.size() >= 2)
          theirs[i].latency.push_back(lat[1]);
        if (bw.size() >= 6)
          theirs[i].bandwidth.push_back(bw[5]);
        if (!ours.empty() && bw.size() >= 6 && bw[5] > 0) {
          if (ours[0].callback.bandwidth_mib > 0)
            callback_pairs[i].push_back(ours[0].callback.bandwidth_mib / bw[5]);
          if (ours[0].polled.bandwidth_mib > 0)
            polled_pairs[i].push_back(ours[0].polled.bandwidth_mib / bw[5]);
        }
      }
    }
    auto print = [&](std::size_t i, const char* name, const samples& ours, const std::vector<double>& pairs) {
      double our_bw = median(ours.bandwidth), their_bw = median(theirs[i].bandwidth);
      double our_best = best(ours.bandwidth, false), their_best = best(theirs[i].bandwidth, false);
      std::printf("%-10s %8zu %-8s | %8.2f %8.2f %8.2f %8.2f | %9.0f %9.0f %9.0f %9.0f | %5.2f %5.2f %6.2f (%2zu)\n",
                  to_string(transport), options.plans[i].bytes, name, median(ours.latency), best(ours.latency, true),
                  median(theirs[i].latency), best(theirs[i].latency, true), our_bw, our_best, their_bw, their_best,
                  their_bw > 0 ? our_bw / their_bw : 0.0, their_best > 0 ? our_best / their_best : 0.0,
                  pairs.empty() ? 0.0 : median(pairs), pairs.size());
    };
    for (std::size_t i = 0; i < options.plans.size(); ++i) {
      if (which.polled)
        print(i, "polled", polled[i], polled_pairs[i]);
      if (which.callback)
        print(i, "callback", callback[i], callback_pairs[i]);
    }
  }
  std::printf("ratio: bandwidth moert / perftest, of the medians and of the bests; pair ratio: the median over the "
              "repetitions of each one's moert / perftest bandwidth, run back to back at that size (ABBA order), n pairs\n");
  std::printf("load average after: %s\n", load_average().c_str());
  std::string sizes;
  for (const auto& p : options.plans)
    sizes += (sizes.empty() ? "" : ",") + std::to_string(p.bytes);
  std::printf("\nrepeat: %s --reps %zu%s --pattern %s --sizes %s --receive-buffers %zu --eager-limit %zu\n", argv[0],
              reps,
              transports.size() == 1 ? (transports[0] == ucx_transport::tcp ? " --transport tcp" : " --transport posix")
                                     : "",
              pattern_arg.c_str(), sizes.c_str(), options.receive_buffers, options.eager_limit);
  return 0;
}
