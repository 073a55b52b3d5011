// transport/nccl_channel: NCCL point-to-point pipes between GPUs. The transfer cases need two
// CUDA devices (NCCL refuses two ranks of one communicator on one GPU); without them the
// binary reports itself skipped (ctest "Not Run", "SKIPPED: ..."), after the cases that run
// anywhere: ids, and the errors for absent devices.

#include "transport/nccl_channel.hpp"

#include "gpu/cuda/device.hpp"
#include "test_support.hpp"

#include <catch2/catch.hpp>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cstring>
#include <future>
#include <vector>

using namespace moert;
using namespace moert::transport;
using namespace std::chrono_literals;

namespace {

// The number of CUDA devices, 0 when there is none (the reason in `why`).
int devices(std::string& why) {
  auto count = cuda::device_count();
  if (!count) {
    why = count.err().message;
    return 0;
  }
  return *count;
}

// A callback that hands its status to the test's thread (no Catch macro off the main thread).
struct outcome {
  std::shared_ptr<std::promise<status>> promise = std::make_shared<std::promise<status>>();
  std::future<status> future = promise->get_future();
  nccl_channel::done callback() {
    return [p = promise](status s) { p->set_value(std::move(s)); };
  }
  // The status, or an error if none came within `limit` (the test's own deadline).
  status wait(std::chrono::milliseconds limit = 20s) {
    if (future.wait_for(limit) != std::future_status::ready)
      return make_error(error_code::device_error, "the test gave up waiting for the callback");
    return future.get();
  }
};

struct device_buffer {
  void* data = nullptr;
  device_buffer(int device, std::size_t bytes) {
    cudaSetDevice(device);
    if (cudaMalloc(&data, bytes) != cudaSuccess)
      data = nullptr;
  }
  ~device_buffer() {
    if (data != nullptr)
      cudaFree(data);
  }
};

}  // namespace

TEST_CASE("nccl_channel: ids are 128 fresh bytes, made without a GPU", "[nccl]") {
  auto a = make_nccl_id();
  auto b = make_nccl_id();
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(*a != *b);
}

TEST_CASE("nccl_channel: an absent CUDA device is a clear error", "[nccl]") {
  std::string why;
  int count = devices(why);
  if (count == 0) {
    auto channel = nccl_channel::create({.device = 0});
    REQUIRE_FALSE(channel.ok());
    CHECK(channel.err().code == error_code::device_error);
    INFO(channel.err().message);
    CHECK(channel.err().message.find("CUDA device 0") != std::string::npos);
    CHECK(channel.err().message.find("no CUDA device") != std::string::npos);
  } else {
    auto channel = nccl_channel::create({.device = count});
    REQUIRE_FALSE(channel.ok());
    INFO(channel.err().message);
    CHECK(channel.err().message.find("CUDA device " + std::to_string(count) + " does not exist") != std::string::npos);
  }
}

TEST_CASE("nccl_channel: bytes from one GPU to another, in the sender's order", "[nccl][gpu]") {
  std::string why;
  int count = devices(why);
  if (count < 2) {
    test::skip_whole_binary(count == 0 ? why + ": the NCCL transfer cases did not run"
                                       : "needs 2 CUDA devices (found 1): the NCCL transfer cases did not run");
    return;
  }
  auto sender = nccl_channel::create({.device = 0});
  auto receiver = nccl_channel::create({.device = 1});
  REQUIRE(sender.ok());
  REQUIRE(receiver.ok());
  auto id = make_nccl_id();
  REQUIRE(id.ok());
  auto out = (*sender)->open_send(*id);
  auto in = (*receiver)->open_receive(*id);
  REQUIRE(out.ok());
  REQUIRE(in.ok());

  constexpr std::size_t bytes = std::size_t{1} << 20;
  constexpr int messages = 3;
  std::vector<std::vector<std::uint8_t>> host(messages, std::vector<std::uint8_t>(bytes));
  std::vector<std::unique_ptr<device_buffer>> src, dst;
  for (int m = 0; m < messages; ++m) {
    for (std::size_t i = 0; i < bytes; ++i)
      host[m][i] = std::uint8_t(i * 7 + m * 31);
    src.push_back(std::make_unique<device_buffer>(0, bytes));
    dst.push_back(std::make_unique<device_buffer>(1, bytes));
    REQUIRE(src.back()->data != nullptr);
    REQUIRE(dst.back()->data != nullptr);
    cudaSetDevice(0);
    REQUIRE(cudaMemcpy(src.back()->data, host[m].data(), bytes, cudaMemcpyHostToDevice) == cudaSuccess);
  }
  std::vector<outcome> sent(messages), received(messages);
  for (int m = 0; m < messages; ++m) {
    auto sequence = (*sender)->send(*out, src[m]->data, bytes, nullptr, sent[m].callback());
    REQUIRE(sequence.ok());
    CHECK(*sequence == std::uint64_t(m));
  }
  // Descriptors that arrive out of order: the receives still pair with the sends in order.
  for (int m : {2, 0, 1})
    (*receiver)->receive(*in, std::uint64_t(m), dst[m]->data, bytes, received[m].callback());
  for (int m = 0; m < messages; ++m) {
    status s = sent[m].wait();
    INFO((s.ok() ? std::string{} : s.err().message));
    CHECK(s.ok());
    status r = received[m].wait();
    INFO((r.ok() ? std::string{} : r.err().message));
    CHECK(r.ok());
    std::vector<std::uint8_t> back(bytes);
    cudaSetDevice(1);
    REQUIRE(cudaMemcpy(back.data(), dst[m]->data, bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
    CHECK(back == host[m]);
  }
  CHECK((*sender)->ready(*out));

  // A message whose turn never comes (message 3 was never sent) fails at its deadline and
  // breaks the pipe; later sends are refused naming the failure.
  outcome lost;
  auto before = std::chrono::steady_clock::now();
  (*receiver)->receive(*in, 4, dst[0]->data, bytes, lost.callback(), 300ms);
  status l = lost.wait();
  REQUIRE_FALSE(l.ok());
  CHECK(l.err().message.find("timed out") != std::string::npos);
  CHECK(std::chrono::steady_clock::now() - before < 5s);
  CHECK_FALSE((*receiver)->ready(*in));

  // cancel_peer fails what is pending on the sending side too.
  outcome pending;
  auto sequence = (*sender)->send(*out, src[0]->data, bytes, nullptr, pending.callback(), 10s);
  REQUIRE(sequence.ok());
  (*sender)->cancel_peer(*out, "peer e0 lost");
  status p = pending.wait();
  // The receiver's abort may reach the sender first (an NCCL error) or the cancel does.
  REQUIRE_FALSE(p.ok());
  INFO(p.err().message);
  auto refused = (*sender)->send(*out, src[0]->data, bytes, nullptr, {});
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.err().message == p.err().message);
}

TEST_CASE("nccl_channel: a peer that never joins fails the pipe at init_timeout", "[nccl][gpu]") {
  std::string why;
  if (devices(why) == 0)
    return;  // the transfer case above already marked the binary skipped
  auto channel = nccl_channel::create({.device = 0, .init_timeout = 500ms});
  REQUIRE(channel.ok());
  auto id = make_nccl_id();
  REQUIRE(id.ok());
  auto pipe = (*channel)->open_send(*id);
  REQUIRE(pipe.ok());
  outcome never;
  auto sequence = (*channel)->send(*pipe, nullptr, 0, nullptr, never.callback(), 10s);
  REQUIRE(sequence.ok());
  status s = never.wait();
  REQUIRE_FALSE(s.ok());
  INFO(s.err().message);
  CHECK(s.err().message.find("did not join") != std::string::npos);
}
