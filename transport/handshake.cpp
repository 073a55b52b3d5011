#include "transport/handshake.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <sys/stat.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>

namespace moert::transport {
namespace {

std::string_view label(handshake_role role) {
  return role == handshake_role::initiator ? "moert-handshake-v1 initiator"
                                           : "moert-handshake-v1 responder";
}

std::string bytes_of(const std::uint8_t* data, std::size_t size) {
  return std::string(reinterpret_cast<const char*>(data), size);
}

nonce nonce_from(std::string_view bytes) {
  nonce n{};
  std::memcpy(n.data(), bytes.data(), nonce_bytes);
  return n;
}

}  // namespace

result<std::string> load_secret(const std::string& path) {
  struct stat info{};
  if (::stat(path.c_str(), &info) != 0)
    return make_error(error_code::io_error, "secret file " + path + ": cannot be read");
  if (!S_ISREG(info.st_mode))
    return make_error(error_code::invalid_argument, "secret file " + path + ": not a regular file");
  if (info.st_mode & (S_IRWXG | S_IRWXO))
    return make_error(error_code::invalid_argument,
                      "secret file " + path + ": readable by group or others (chmod 600 it)");
  if (static_cast<std::size_t>(info.st_size) > max_secret_bytes + 1)
    return make_error(error_code::invalid_argument,
                      "secret file " + path + ": longer than " + std::to_string(max_secret_bytes) + " bytes");
  std::ifstream in{path, std::ios::binary};
  if (!in)
    return make_error(error_code::io_error, "secret file " + path + ": cannot be opened");
  std::string secret{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  if (!secret.empty() && secret.back() == '\n')
    secret.pop_back();
  if (secret.empty())
    return make_error(error_code::invalid_argument, "secret file " + path + ": empty");
  if (secret.size() > max_secret_bytes)
    return make_error(error_code::invalid_argument,
                      "secret file " + path + ": longer than " + std::to_string(max_secret_bytes) + " bytes");
  return secret;
}

nonce fresh_nonce() {
  nonce n{};
  // RAND_bytes fails only when the CSPRNG cannot be seeded: authentication without fresh
  // nonces would be replayable, so that is fatal.
  if (RAND_bytes(n.data(), static_cast<int>(n.size())) != 1)
    throw std::runtime_error("OpenSSL RAND_bytes failed: no entropy for handshake nonces");
  return n;
}

proof make_proof(std::string_view secret, handshake_role prover, const nonce& prover_nonce,
                 const nonce& verifier_nonce) {
  std::string message{label(prover)};
  message += bytes_of(prover_nonce.data(), prover_nonce.size());
  message += bytes_of(verifier_nonce.data(), verifier_nonce.size());
  proof out{};
  unsigned int length = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
       reinterpret_cast<const unsigned char*>(message.data()), message.size(), out.data(), &length);
  return out;
}

bool check_proof(std::string_view secret, handshake_role prover, const nonce& prover_nonce,
                 const nonce& verifier_nonce, std::string_view received) {
  if (received.size() != proof_bytes)
    return false;
  auto expected = make_proof(secret, prover, prover_nonce, verifier_nonce);
  return CRYPTO_memcmp(expected.data(), received.data(), proof_bytes) == 0;
}

handshake_initiator::handshake_initiator(std::string secret) : secret_(std::move(secret)) {}

std::string handshake_initiator::hello() {
  own_ = fresh_nonce();
  return bytes_of(own_.data(), own_.size());
}

result<std::string> handshake_initiator::answer(std::string_view challenge) {
  if (challenge.size() != nonce_bytes + proof_bytes)
    return make_error(error_code::invalid_argument,
                      "handshake: challenge of " + std::to_string(challenge.size()) + " bytes, expected " +
                          std::to_string(nonce_bytes + proof_bytes));
  auto peer = nonce_from(challenge.substr(0, nonce_bytes));
  if (!check_proof(secret_, handshake_role::responder, peer, own_, challenge.substr(nonce_bytes)))
    return make_error(error_code::invalid_argument, "handshake: the peer does not hold the shared secret");
  auto mine = make_proof(secret_, handshake_role::initiator, own_, peer);
  return bytes_of(mine.data(), mine.size());
}

handshake_responder::handshake_responder(std::string secret) : secret_(std::move(secret)) {}

result<std::string> handshake_responder::challenge(std::string_view hello) {
  if (challenged_)
    return make_error(error_code::invalid_argument, "handshake: a second hello on one connection");
  if (hello.size() != nonce_bytes)
    return make_error(error_code::invalid_argument,
                      "handshake: hello of " + std::to_string(hello.size()) + " bytes, expected " +
                          std::to_string(nonce_bytes));
  peer_ = nonce_from(hello);
  own_ = fresh_nonce();
  challenged_ = true;
  auto mine = make_proof(secret_, handshake_role::responder, own_, peer_);
  return bytes_of(own_.data(), own_.size()) + bytes_of(mine.data(), mine.size());
}

status handshake_responder::verify(std::string_view answer) {
  if (!challenged_ || done_)
    return make_error(error_code::invalid_argument, "handshake: answer out of order");
  done_ = true;  // one try per challenge: a wrong answer cannot be retried against the same nonce
  if (!check_proof(secret_, handshake_role::initiator, peer_, own_, answer))
    return make_error(error_code::invalid_argument, "handshake: the peer does not hold the shared secret");
  return status::success();
}

}  // namespace moert::transport
