#pragma once

#include <cstddef>

namespace moert::gpu {

// How work is weighed when it is split over threads or lanes (never what it computes: which
// thread runs a piece never changes its bits). Streaming a weight element from memory costs
// about as much time as this many multiply-adds (one core: ~5 G floats/s of DRAM bandwidth
// against ~40 G multiply-adds/s of AVX2 fma), so a matmul of r rows over an n × k matrix
// weighs (r + weight_stream_rows) · n · k, and an expert of r rows weighs r + weight_stream_rows
// rows. Shared by cpu::matmul_work and the reference forward's expert lanes so both split alike.
inline constexpr std::size_t weight_stream_rows = 8;

}  // namespace moert::gpu
