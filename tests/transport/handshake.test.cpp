#include <catch2/catch.hpp>

#include "transport/handshake.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

using namespace moert;
using namespace moert::transport;

namespace {

std::filesystem::path write_file(const std::string& name, const std::string& text, mode_t mode) {
  auto path = std::filesystem::temp_directory_path() / ("moert-handshake-" + std::to_string(::getpid()) + "-" + name);
  std::ofstream{path, std::ios::binary} << text;
  ::chmod(path.c_str(), mode);
  return path;
}

// Runs both sides; returns whether each side accepted the other.
struct outcome {
  bool initiator_accepted = false;
  bool responder_accepted = false;
};
outcome run(const std::string& initiator_secret, const std::string& responder_secret) {
  handshake_initiator initiator{initiator_secret};
  handshake_responder responder{responder_secret};
  auto challenge = responder.challenge(initiator.hello());
  REQUIRE(challenge.ok());
  auto answer = initiator.answer(*challenge);
  outcome result;
  result.initiator_accepted = answer.ok();
  if (answer.ok())
    result.responder_accepted = responder.verify(*answer).ok();
  return result;
}

}  // namespace

TEST_CASE("peers holding the same secret accept each other") {
  auto result = run("cookie", "cookie");
  CHECK(result.initiator_accepted);
  CHECK(result.responder_accepted);
}

TEST_CASE("a wrong secret is refused by whichever side checks first") {
  auto result = run("cookie", "biscuit");
  CHECK_FALSE(result.initiator_accepted);  // the responder's proof does not check out
  CHECK_FALSE(result.responder_accepted);

  // An initiator that skips checking and answers with its own (wrong) proof is refused too.
  handshake_responder responder{"cookie"};
  handshake_initiator impostor{"biscuit"};
  auto hello = impostor.hello();
  auto challenge = responder.challenge(hello);
  REQUIRE(challenge.ok());
  nonce impostor_nonce{}, responder_nonce{};
  std::copy(hello.begin(), hello.end(), impostor_nonce.begin());
  std::copy(challenge->begin(), challenge->begin() + nonce_bytes, responder_nonce.begin());
  auto forged = make_proof("biscuit", handshake_role::initiator, impostor_nonce, responder_nonce);
  CHECK_FALSE(responder.verify(std::string(forged.begin(), forged.end())).ok());
}

TEST_CASE("a recorded handshake replayed to a new responder is refused") {
  handshake_initiator initiator{"cookie"};
  handshake_responder first{"cookie"};
  auto hello = initiator.hello();
  auto challenge = first.challenge(hello);
  REQUIRE(challenge.ok());
  auto answer = initiator.answer(*challenge);
  REQUIRE(answer.ok());
  REQUIRE(first.verify(*answer).ok());

  // The attacker replays the same hello and answer: the new responder's nonce differs.
  handshake_responder second{"cookie"};
  REQUIRE(second.challenge(hello).ok());
  CHECK_FALSE(second.verify(*answer).ok());
}

TEST_CASE("a responder's proof cannot be reflected back as an initiator's") {
  handshake_responder responder{"cookie"};
  nonce attacker_nonce = fresh_nonce();
  auto challenge = responder.challenge(std::string(attacker_nonce.begin(), attacker_nonce.end()));
  REQUIRE(challenge.ok());
  // Reflect the responder's own proof.
  CHECK_FALSE(responder.verify(challenge->substr(nonce_bytes)).ok());
}

TEST_CASE("malformed and out-of-order handshake messages are refused") {
  handshake_responder responder{"cookie"};
  CHECK_FALSE(responder.verify(std::string(proof_bytes, 'x')).ok());  // no challenge yet
  CHECK_FALSE(responder.challenge("short").ok());
  CHECK_FALSE(responder.challenge(std::string(4096, 'x')).ok());
  handshake_initiator initiator{"cookie"};
  initiator.hello();
  CHECK_FALSE(initiator.answer("").ok());
  CHECK_FALSE(initiator.answer(std::string(nonce_bytes + proof_bytes + 1, 'x')).ok());

  // One answer per challenge: a wrong try burns it.
  handshake_responder once{"cookie"};
  handshake_initiator honest{"cookie"};
  auto challenge = once.challenge(honest.hello());
  REQUIRE(challenge.ok());
  auto answer = honest.answer(*challenge);
  REQUIRE(answer.ok());
  CHECK_FALSE(once.verify(std::string(proof_bytes, 'x')).ok());
  CHECK_FALSE(once.verify(*answer).ok());
}

TEST_CASE("nonces are fresh") {
  CHECK(fresh_nonce() != fresh_nonce());
}

TEST_CASE("secret files: readable by the owner only, not empty, bounded") {
  auto good = write_file("good", "s3cret\n", 0600);
  auto secret = load_secret(good.string());
  REQUIRE(secret.ok());
  CHECK(*secret == "s3cret");

  auto shared = write_file("shared", "s3cret", 0644);
  auto refused = load_secret(shared.string());
  REQUIRE_FALSE(refused.ok());
  CHECK_THAT(refused.err().message, Catch::Contains("readable by group or others"));

  auto empty = write_file("empty", "\n", 0600);
  CHECK_FALSE(load_secret(empty.string()).ok());
  auto huge = write_file("huge", std::string(max_secret_bytes + 10, 'x'), 0600);
  CHECK_FALSE(load_secret(huge.string()).ok());
  auto missing = load_secret("/nonexistent/moert-secret");
  REQUIRE_FALSE(missing.ok());
  CHECK_THAT(missing.err().message, Catch::Contains("/nonexistent/moert-secret"));
  for (auto& path : {good, shared, empty, huge})
    std::filesystem::remove(path);
}
