// The tensor path between two processes: moert's UCX channel (transport/ucx_channel) against
// ucx_perftest on the same machine, same transport and sizes, in one run.
//
//   build/bench/moert_bench_transport [--transport tcp|posix|both] [--reps N]
//
// Latency is one-way (half the ping-pong round trip, p50 over the iterations); bandwidth
// streams `window` messages in flight. The channel's figures include what every real
// transfer pays: the completion callback on the channel thread. Each repetition runs moert's
// pair of processes and then ucx_perftest's, size by size, so both see the same moment's load;
// the table gives the median and the best of the repetitions, and the ratio of the medians
// (the load average is printed before and after: on a shared 2-core VM it moves everything).

#include "bench/bench_support.hpp"
#include "transport/ucx_channel.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
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
constexpr std::array<plan, 3> plans{{{4096, 2000, 4000}, {65536, 1000, 2000}, {1 << 20, 300, 600}}};
constexpr std::size_t window = 16;

// The echo side: mirrors every latency message, swallows the bandwidth stream.
int run_echo(ucx_transport transport, int to_parent, int from_parent) {
  auto made = ucx_channel::create({.transport = transport, .pool_bytes = std::size_t{64} << 20});
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
    for (std::size_t i = 0; i < p.latency_iterations; ++i, ++tag) {
      auto got = receive_and_wait(channel, *parent, tag, p.bytes);
      if (!got.ok())
        return 1;
      // Echo from the received pool buffer itself: no copy.
      std::promise<status> sent;
      auto echoed = sent.get_future();
      channel.send(*parent, tag, got->data(), got->size(), got->storage(), [&](status s) { sent.set_value(std::move(s)); });
      if (!echoed.get().ok())
        return 1;
    }
    // Keep `window` receives posted ahead of the stream.
    std::mutex mutex;
    std::condition_variable changed;
    std::size_t received = 0, failed = 0;
    std::size_t posted = 0;
    std::uint64_t first = tag;
    auto post = [&](std::uint64_t t) {
      channel.receive(*parent, t, p.bytes, [&](result<received_buffer> r) {
        std::lock_guard<std::mutex> guard{mutex};
        ++received;
        failed += r.ok() ? 0 : 1;
        changed.notify_all();
      });
    };
    for (; posted < std::min(window * 2, p.bandwidth_messages); ++posted)
      post(first + posted);
    {
      std::unique_lock<std::mutex> lock{mutex};
      while (received < p.bandwidth_messages) {
        std::size_t seen = received;
        if (!changed.wait_for(lock, std::chrono::seconds{30}, [&] { return received != seen; }))
          return 1;  // the stream stalled
        while (posted < p.bandwidth_messages && posted < received + window * 2) {
          lock.unlock();
          post(first + posted++);
          lock.lock();
        }
      }
    }
    tag += p.bandwidth_messages;
    if (failed)
      return 1;
    auto ack = std::make_shared<const std::vector<std::uint8_t>>(1, 1);
    if (!send_and_wait(channel, *parent, done_tag, ack).ok())
      return 1;
  }
  return 0;
}

struct figures {
  double latency_us = 0;     // one-way, p50
  double bandwidth_mib = 0;  // MiB/s
};

std::vector<figures> run_driver(ucx_transport transport) {
  int up[2], down[2];
  if (::pipe(up) != 0 || ::pipe(down) != 0)
    return {};
  pid_t child = ::fork();
  if (child == 0) {
    ::close(up[0]);
    ::close(down[1]);
    ::_exit(run_echo(transport, up[1], down[0]));
  }
  ::close(up[1]);
  ::close(down[0]);
  std::vector<figures> out;
  auto made = ucx_channel::create({.transport = transport, .pool_bytes = std::size_t{64} << 20});
  if (made.ok()) {
    auto& channel = **made;
    auto echo = channel.connect(receive_string(up[0]));
    send_string(down[1], channel.address());
    std::uint64_t tag = 0;
    for (const auto& p : plans) {
      auto payload = std::make_shared<std::vector<std::uint8_t>>(p.bytes);
      for (std::size_t i = 0; i < p.bytes; ++i)
        (*payload)[i] = static_cast<std::uint8_t>(i * 7);
      std::vector<double> one_way;
      for (std::size_t i = 0; i < p.latency_iterations; ++i, ++tag) {
        auto start = clock_type::now();
        std::promise<result<received_buffer>> back;
        auto future = back.get_future();
        channel.receive(*echo, tag, p.bytes, [&](result<received_buffer> r) { back.set_value(std::move(r)); });
        (void)send_and_wait(channel, *echo, tag, payload);
        auto got = future.get();
        auto rtt = std::chrono::duration<double, std::micro>(clock_type::now() - start).count();
        if (!got.ok() || !std::equal(got->bytes().begin(), got->bytes().end(), payload->begin(), payload->end())) {
          std::fprintf(stderr, "latency: echo %s at %zu bytes, iteration %zu\n",
                       got.ok() ? "differs" : got.err().message.c_str(), p.bytes, i);
          ::kill(child, SIGKILL);  // the two sides are out of step now
          ::waitpid(child, nullptr, 0);
          return out;
        }
        one_way.push_back(rtt / 2);
      }
      std::sort(one_way.begin(), one_way.end());
      figures f;
      f.latency_us = one_way.empty() ? 0 : one_way[one_way.size() / 2];

      std::promise<result<received_buffer>> acked;
      auto ack = acked.get_future();
      channel.receive(*echo, done_tag, 1, [&](result<received_buffer> r) { acked.set_value(std::move(r)); },
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
        channel.send(*echo, tag + i, payload, [&](status) {
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
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--transport" && i + 1 < argc) {
      std::string which = argv[++i];
      if (which == "tcp")
        transports = {ucx_transport::tcp};
      else if (which == "posix")
        transports = {ucx_transport::posix};
      else if (which != "both") {
        std::fprintf(stderr, "--transport '%s': expected tcp, posix or both\n", which.c_str());
        return 2;
      }
    } else if (arg == "--reps" && i + 1 < argc) {
      reps = std::max<std::size_t>(1, std::strtoul(argv[++i], nullptr, 10));
    } else if (arg == "--help" || arg == "-h") {
      std::printf("usage: %s [--transport tcp|posix|both] [--reps N]\n", argv[0]);
      return 0;
    } else {
      std::fprintf(stderr, "unknown option %s (see --help)\n", arg.c_str());
      return 2;
    }
  }
  std::printf("moert transport bench: moert's UCX channel between two processes vs ucx_perftest, %zu repetitions "
              "(median / best), bandwidth window %zu\n",
              reps, window);
  std::printf("load average before: %s\n", load_average().c_str());
  std::printf("%-10s %8s | %17s %17s | %19s %19s | %5s %5s\n", "transport", "bytes", "lat moert", "lat perftest",
              "bw moert", "bw perftest", "ratio", "ratio");
  std::printf("%-10s %8s | %17s %17s | %19s %19s | %5s %5s\n", "", "", "us one-way med/bst", "us one-way med/bst",
              "MiB/s med/best", "MiB/s med/best", "med", "best");
  int port = 13400 + static_cast<int>(::getpid() % 500) * 8;
  for (auto transport : transports) {
    std::vector<std::vector<double>> our_lat(plans.size()), our_bw(plans.size()), their_lat(plans.size()),
        their_bw(plans.size());
    for (std::size_t r = 0; r < reps; ++r) {
      auto ours = run_driver(transport);
      for (std::size_t i = 0; i < plans.size(); ++i) {
        const auto& p = plans[i];
        if (i < ours.size()) {
          our_lat[i].push_back(ours[i].latency_us);
          our_bw[i].push_back(ours[i].bandwidth_mib);
        }
        auto lat = perftest_final("tag_lat", transport, p.bytes, p.latency_iterations, port++);
        auto bw = perftest_final("tag_bw", transport, p.bytes, p.bandwidth_messages, port++);
        if (lat.size() >= 2)
          their_lat[i].push_back(lat[1]);
        if (bw.size() >= 6)
          their_bw[i].push_back(bw[5]);
        if (port > 60000)
          port = 13400;
      }
    }
    for (std::size_t i = 0; i < plans.size(); ++i) {
      double ours = median(our_bw[i]), theirs = median(their_bw[i]);
      double our_best = best(our_bw[i], false), their_best = best(their_bw[i], false);
      std::printf("%-10s %8zu | %8.2f %8.2f %8.2f %8.2f | %9.0f %9.0f %9.0f %9.0f | %5.2f %5.2f\n", to_string(transport),
                  plans[i].bytes, median(our_lat[i]), best(our_lat[i], true), median(their_lat[i]),
                  best(their_lat[i], true), ours, our_best, theirs, their_best, theirs > 0 ? ours / theirs : 0.0,
                  their_best > 0 ? our_best / their_best : 0.0);
    }
  }
  std::printf("load average after: %s\n", load_average().c_str());
  std::printf("\nrepeat: %s --reps %zu%s\n", argv[0], reps,
              transports.size() == 1 ? (transports[0] == ucx_transport::tcp ? " --transport tcp" : " --transport posix")
                                     : "");
  return 0;
}
