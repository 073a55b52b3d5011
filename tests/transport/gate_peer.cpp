// A node for the gate tests, as a real process: a CAF system whose middleman listens on
// loopback only, an echo actor published there, and an inbound gate in front of it.
//
//   gate_peer SECRET_FILE HANDSHAKE_TIMEOUT_MS MAX_FRAME_BYTES
//
// Prints "port <gate port>" once it serves; runs until stdin closes.

#include "transport/auth_gate.hpp"
#include "transport/handshake.hpp"

#include <caf/all.hpp>
#include <caf/io/all.hpp>

#include <cstdio>
#include <iostream>
#include <string>

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: gate_peer SECRET_FILE HANDSHAKE_TIMEOUT_MS MAX_FRAME_BYTES\n");
    return 2;
  }
  auto secret = moert::transport::load_secret(argv[1]);
  if (!secret.ok()) {
    std::fprintf(stderr, "gate_peer: %s\n", secret.err().what().c_str());
    return 1;
  }
  caf::actor_system_config config;
  config.load<caf::io::middleman>();
  caf::actor_system system{config};
  moert::transport::inbound_gate* gate_ptr = nullptr;
  auto echo = system.spawn([&gate_ptr]() -> caf::behavior {
    return {
        [](int value) { return value * 2; },
        [](const std::string& text) { return text; },
        [&gate_ptr](caf::get_atom) {
          const auto& c = gate_ptr->counters();
          // A string: CAF 0.17 has no built-in vector<uint64_t> message type.
          return std::to_string(c.authenticated.load()) + " " + std::to_string(c.refused.load()) + " " +
                 std::to_string(c.timed_out.load()) + " " + std::to_string(c.oversized_frames.load()) + " " +
                 std::to_string(c.over_capacity.load());
        },
    };
  });
  auto caf_port = system.middleman().publish(echo, 0, "127.0.0.1", true);
  if (!caf_port) {
    std::fprintf(stderr, "gate_peer: publish failed: %s\n", system.render(caf_port.error()).c_str());
    return 1;
  }
  moert::transport::gate_limits limits;
  limits.handshake_timeout = std::chrono::milliseconds{std::stoi(argv[2])};
  limits.max_frame_bytes = std::stoull(argv[3]);
  auto gate = moert::transport::inbound_gate::start("127.0.0.1", 0, *secret, *caf_port, limits);
  if (!gate.ok()) {
    std::fprintf(stderr, "gate_peer: %s\n", gate.err().what().c_str());
    return 1;
  }
  gate_ptr = gate->get();
  std::printf("port %u\n", static_cast<unsigned>((*gate)->port()));
  std::fflush(stdout);
  std::string line;
  while (std::getline(std::cin, line)) {
  }
  caf::anon_send_exit(echo, caf::exit_reason::user_shutdown);
  return 0;
}
