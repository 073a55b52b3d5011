// The wire's row packing (actors/protocol.hpp, wire::pack_rows): what an A2E or E2A carries
// across a process is the rows its entries name, each once, in first-use order, with the
// entries renumbered to match; a row past the block is not read.

#include "actors/protocol.hpp"

#include <catch2/catch.hpp>

#include <cstring>
#include <limits>

using namespace moert::actors;

namespace {

row_block numbered_block(std::size_t rows, std::size_t row_floats) {
  row_block block;
  block.row_floats = row_floats;
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t f = 0; f < row_floats; ++f)
      block.data.push_back(float(r * 100 + f));
  return block;
}

std::vector<float> floats_of(const std::vector<std::uint8_t>& bytes) {
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

}  // namespace

TEST_CASE("pack_rows packs each named row once, in first-use order, and renumbers the entries", "[unit]") {
  auto block = numbered_block(6, 3);
  std::vector<std::uint32_t> renumbered;
  auto bytes = wire::pack_rows(block, {4, 1, 4, 4, 0, 1}, renumbered);
  CHECK(renumbered == std::vector<std::uint32_t>{0, 1, 0, 0, 2, 1});
  CHECK(floats_of(bytes) == std::vector<float>{400, 401, 402, 100, 101, 102, 0, 1, 2});

  std::size_t rows = 0;
  auto back = wire::unpack_rows(3, bytes, rows);
  REQUIRE(back);
  CHECK(rows == 3);
  CHECK(back->row(renumbered[0])[2] == 402);
}

TEST_CASE("pack_rows of a prefill-sized A2E: 1024 routes over 512 rows", "[unit]") {
  auto block = numbered_block(512, 2);
  std::vector<std::uint32_t> named, renumbered;
  for (std::uint32_t i = 0; i < 1024; ++i)
    named.push_back((i * 7) % 512);
  auto bytes = wire::pack_rows(block, named, renumbered);
  CHECK(bytes.size() == 512 * 2 * sizeof(float));
  auto packed = floats_of(bytes);
  for (std::size_t i = 0; i < named.size(); ++i)
    REQUIRE(packed[renumbered[i] * 2] == float(named[i] * 100));
}

TEST_CASE("pack_rows does not read a row past the block: its entry names no packed row", "[unit]") {
  auto block = numbered_block(2, 4);
  std::vector<std::uint32_t> renumbered;
  auto bytes = wire::pack_rows(block, {1, 9}, renumbered);
  CHECK(floats_of(bytes) == std::vector<float>{100, 101, 102, 103});
  REQUIRE(renumbered.size() == 2);
  CHECK(renumbered[0] == 0);
  CHECK(renumbered[1] == std::numeric_limits<std::uint32_t>::max());
  expert_outputs out;
  out.rows_idx = renumbered;
  CHECK_FALSE(wire::entries_fit(out, 1));  // what a receiver checks
}
