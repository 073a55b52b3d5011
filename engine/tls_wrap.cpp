#include "engine/tls_wrap.hpp"

#include <openssl/err.h>
#include <openssl/ssl.h>

#include <dlfcn.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>

namespace {

std::atomic<std::uint64_t> bytes_moved{0};

int counted(int result) {
  if (result > 0)
    bytes_moved.fetch_add(std::uint64_t(result), std::memory_order_relaxed);
  return result;
}

// libssl's own definition of `name` (the next one after this executable's). Resolved once per
// function; a libssl without it is a broken installation, so abort loudly.
template <class Function>
Function real(const char* name) {
  void* found = ::dlsym(RTLD_NEXT, name);
  if (found == nullptr) {
    std::fprintf(stderr, "moert: libssl has no %s (%s)\n", name, ::dlerror());
    std::abort();
  }
  return reinterpret_cast<Function>(found);
}

}  // namespace

extern "C" {

int SSL_read(SSL* ssl, void* buf, int num) {
  static auto next = real<int (*)(SSL*, void*, int)>("SSL_read");
  ERR_clear_error();
  return counted(next(ssl, buf, num));
}

int SSL_write(SSL* ssl, const void* buf, int num) {
  static auto next = real<int (*)(SSL*, const void*, int)>("SSL_write");
  ERR_clear_error();
  return counted(next(ssl, buf, num));
}

int SSL_connect(SSL* ssl) {
  static auto next = real<int (*)(SSL*)>("SSL_connect");
  ERR_clear_error();
  return next(ssl);
}

int SSL_accept(SSL* ssl) {
  static auto next = real<int (*)(SSL*)>("SSL_accept");
  ERR_clear_error();
  return next(ssl);
}

int SSL_shutdown(SSL* ssl) {
  static auto next = real<int (*)(SSL*)>("SSL_shutdown");
  ERR_clear_error();
  return next(ssl);
}

}  // extern "C"

namespace moert {

std::uint64_t tls_bytes_moved() {
  return bytes_moved.load(std::memory_order_relaxed);
}

bool tls_error_queue_guarded() {
  // What a shared library's call to SSL_read binds to: the first definition in the global
  // lookup scope, which starts with the executable.
  return ::dlsym(RTLD_DEFAULT, "SSL_read") == reinterpret_cast<void*>(&::SSL_read);
}

}  // namespace moert
