#pragma once

// A fix for CAF 0.17's OpenSSL module (libcaf_openssl), which breaks healthy TLS connections.
//
// OpenSSL keeps one error queue per thread, and SSL_get_error() reads it: "the current
// thread's error queue must be empty before the TLS/SSL I/O operation is attempted, or
// SSL_get_error() will not work reliably" (SSL_get_error(3)). libcaf_openssl 0.17 never
// clears it (CAF fixed this only in its new libcaf_net, actor-framework commit 2815cf255,
// "Fix error handling in OpenSSL wrapper"), and it drains it only inside log statements that
// Debian's build compiles out. So once one TLS connection of a process fails (a peer that
// exits without close_notify: OpenSSL 3 queues "unexpected eof while reading"; a peer whose
// certificate the CA did not sign), the multiplexer thread's queue keeps that error, and the
// next read of any other TLS connection in that thread that ends with "want read" is taken
// for a fatal error: CAF closes it. A node thus cut its node-to-node connections at the next
// heartbeat after an engine left, and requests sent in that window were lost.
//
// This file defines SSL_read, SSL_write, SSL_connect, SSL_accept and SSL_shutdown in the
// executable: the dynamic linker binds libcaf_openssl's calls to these first, and each clears
// the calling thread's error queue and calls libssl's own function (found with RTLD_NEXT),
// which is what CAF's later wrapper does. Linked into every binary that links moert_engine
// and calls configure_for_cluster (the reference to tls_error_queue_guarded pulls it in).
//
// The same wrappers count the application bytes this process reads and writes over TLS: with
// TLS there is no gate whose counters say what the engine's CAF connections carry.

#include <cstdint>

namespace moert {

// Whether libcaf_openssl's SSL_read resolves to the clearing wrapper in this process (false
// when the executable does not export it, e.g. a build with symbols hidden from shared libs).
bool tls_error_queue_guarded();

// Bytes of application data (BASP, before encryption) that SSL_read returned and SSL_write
// took in this process since it started, every TLS connection together. Thread-safe.
std::uint64_t tls_bytes_moved();

}  // namespace moert
