#pragma once

// Mutual authentication of two moert processes on a shared secret, Erlang's cookie model:
// it proves that both sides hold the secret and never sends it; it does not encrypt.
//
//   initiator                                   responder
//   hello {nonce_i}                  ─────────▶
//                                    ◀─────────  challenge {nonce_r, proof_r}
//   proof_r == HMAC(secret, "responder" ‖ nonce_i ‖ nonce_r)?
//   answer {proof_i}                 ─────────▶  proof_i == HMAC(secret, "initiator" ‖ nonce_r ‖ nonce_i)?
//
// Each side contributes a fresh 32-byte nonce from OpenSSL's CSPRNG, so a recorded exchange
// replayed later fails: the other side's nonce differs. Proofs are compared in constant time.
// The role labels keep a responder's proof from being reflected back as an initiator's.
//
// The messages are plain byte strings: the caller carries them over whatever channel it
// authenticates (a CAF connection before any actor is handed out, UCX's address exchange).
// Thread safety: the classes are single-use state machines for one thread; the free
// functions are pure.

#include "core/error.hpp"

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace moert::transport {

inline constexpr std::size_t nonce_bytes = 32;
inline constexpr std::size_t proof_bytes = 32;  // HMAC-SHA256
inline constexpr std::size_t max_secret_bytes = 4096;

using nonce = std::array<std::uint8_t, nonce_bytes>;
using proof = std::array<std::uint8_t, proof_bytes>;

// Reads a shared-secret file: the whole file less one trailing newline. Refused: a file that
// cannot be read, an empty secret, one over max_secret_bytes, or one readable by group or
// others (as ssh and Erlang refuse keys others can read).
result<std::string> load_secret(const std::string& path);

nonce fresh_nonce();

enum class handshake_role : std::uint8_t { initiator, responder };

// HMAC-SHA256(secret, role label ‖ own_nonce ‖ peer_nonce) where own/peer are the prover's.
proof make_proof(std::string_view secret, handshake_role prover, const nonce& prover_nonce,
                 const nonce& verifier_nonce);
// Constant-time comparison of `received` against the expected proof.
bool check_proof(std::string_view secret, handshake_role prover, const nonce& prover_nonce,
                 const nonce& verifier_nonce, std::string_view received);

// The initiator's side: hello(), then on the responder's challenge answer() or an error.
class handshake_initiator {
public:
  explicit handshake_initiator(std::string secret);
  // The first message: the initiator's nonce.
  std::string hello();
  // The challenge is the responder's nonce followed by its proof. Returns the answer to send,
  // or an error when the responder did not prove it holds the secret.
  result<std::string> answer(std::string_view challenge);

private:
  std::string secret_;
  nonce own_{};
};

// The responder's side: challenge(hello), then verify(answer).
class handshake_responder {
public:
  explicit handshake_responder(std::string secret);
  result<std::string> challenge(std::string_view hello);
  // Succeeds once, only after challenge(), only for the initiator's correct proof.
  status verify(std::string_view answer);

private:
  std::string secret_;
  nonce own_{};
  nonce peer_{};
  bool challenged_ = false;
  bool done_ = false;
};

}  // namespace moert::transport
