#include <catch2/catch.hpp>

#include "gpu/cpu/gemm.hpp"
#include "gpu/cpu/weight_memory.hpp"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace moert::cpu {

namespace {

// The transparent-huge-page mode in brackets ("always", "madvise", "never"), or "" without THP.
std::string thp_mode() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string all;
  std::getline(in, all);
  const auto open = all.find('['), close = all.find(']');
  return open == std::string::npos || close == std::string::npos ? "" : all.substr(open + 1, close - open - 1);
}

// The smaps fields (name → kB or flag value) of the mapping holding `p`; empty when none does.
std::vector<std::pair<std::string, long>> smaps_of(const void* p) {
  const auto addr = reinterpret_cast<std::uintptr_t>(p);
  std::ifstream in("/proc/self/smaps");
  std::vector<std::pair<std::string, long>> fields;
  bool inside = false;
  for (std::string line; std::getline(in, line);) {
    std::uintptr_t lo = 0, hi = 0;
    char dash = 0;
    std::istringstream head(line);
    if (head >> std::hex >> lo >> dash >> hi && dash == '-' && line.find(':') > line.find(' ')) {
      if (inside)
        break;
      inside = lo <= addr && addr < hi;
      continue;
    }
    if (!inside)
      continue;
    const auto colon = line.find(':');
    if (colon != std::string::npos)
      fields.emplace_back(line.substr(0, colon), std::atol(line.c_str() + colon + 1));
  }
  return fields;
}

long field(const std::vector<std::pair<std::string, long>>& fields, const std::string& name) {
  for (const auto& [n, v] : fields)
    if (n == name)
      return v;
  return -1;
}

}  // namespace

TEST_CASE("with MOERT_WEIGHT_HUGE_PAGES=1 packed weights lie in memory advised for huge pages", "[gemm][thp]") {
  const std::string mode = thp_mode();
  if (mode != "madvise") {
    WARN("transparent huge pages are '" << mode << "' here, not madvise: nothing to check");
    return;
  }
  // Before this binary's first weight allocation, so the first chunk is advised.
  ::setenv("MOERT_WEIGHT_HUGE_PAGES", "1", 1);
  // A 4 MiB matrix (an F32 1024 × 1024 projection) and a 1 MiB one (a BF16 expert's down).
  std::vector<float> w(1024 * 1024);
  for (std::size_t i = 0; i < w.size(); ++i)
    w[i] = float(i % 977) - 488.0f;
  std::vector<std::uint16_t> half(1024 * 512, 0x3f80);  // bf16 1.0
  packed_matrix big = packed_matrix::pack(w.data(), 1024, 1024);
  packed_matrix small = packed_matrix::pack(dtype::bf16, half.data(), 1024, 512);
  for (const packed_matrix* m : {&big, &small}) {
    INFO(m->num_bytes() << " bytes at " << m->panel(0));
    auto fields = smaps_of(m->panel(0));
    REQUIRE(!fields.empty());
    // THPeligible (Linux ≥ 5.0) says the mapping may get huge pages: under "madvise" only
    // memory given MADV_HUGEPAGE is; a plain aligned_alloc is not.
    const long eligible = field(fields, "THPeligible");
    if (eligible < 0)
      WARN("this kernel's smaps has no THPeligible field");
    else
      CHECK(eligible == 1);
    if (field(fields, "AnonHugePages") <= 0)
      WARN("no huge page was available to the mapping (fragmented memory?)");
  }
  // The bytes are the packed values, whatever the memory.
  CHECK(big.at(5, 7) == w[5 * 1024 + 7]);
  CHECK(big.at(1023, 1023) == w[1023 * 1024 + 1023]);
  CHECK(small.at(1000, 511) == 1.0f);

  // Unset or "0" (the default): a new mapping (over the 64 MiB own-mapping limit) is not
  // advised, so under "madvise" it may not get huge pages. Only a byte is touched.
  for (const char* value : {"0", static_cast<const char*>(nullptr)}) {
    if (value != nullptr)
      ::setenv("MOERT_WEIGHT_HUGE_PAGES", value, 1);
    else
      ::unsetenv("MOERT_WEIGHT_HUGE_PAGES");
    auto plain = allocate_weight_bytes(std::size_t{80} << 20);
    plain.get()[0] = std::byte{1};
    const long eligible = field(smaps_of(plain.get()), "THPeligible");
    INFO("MOERT_WEIGHT_HUGE_PAGES=" << (value ? value : "(unset)"));
    if (eligible >= 0)
      CHECK(eligible == 0);
  }
}

TEST_CASE("weight memory is zeroed, 64-byte aligned and outlives the allocations around it", "[gemm][thp]") {
  std::vector<std::shared_ptr<std::byte>> blocks;
  // Sizes that fill a 256 MiB chunk and spill into the next, one over the 64 MiB own-mapping
  // limit, and odd small ones.
  const std::size_t sizes[] = {100, std::size_t{3} << 20, std::size_t{100} << 20, std::size_t{5} << 20,
                               std::size_t{60} << 20, std::size_t{100} << 20, 7};
  for (std::size_t bytes : sizes)
    blocks.push_back(allocate_weight_bytes(bytes));
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    const std::byte* p = blocks[i].get();
    REQUIRE(p != nullptr);
    CHECK(reinterpret_cast<std::uintptr_t>(p) % 64 == 0);
    // Only a few bytes are touched: a first touch of huge pages is slow on some VMs.
    CHECK(p[0] == std::byte{0});
    CHECK(p[sizes[i] / 2] == std::byte{0});
    CHECK(p[sizes[i] - 1] == std::byte{0});
    blocks[i].get()[0] = blocks[i].get()[sizes[i] - 1] = std::byte(i + 1);  // writable
  }
  // No block overlaps another, and releasing some leaves the others' bytes in place.
  blocks[0].reset();
  blocks[3].reset();
  for (std::size_t i : {1u, 2u, 4u, 5u, 6u}) {
    const std::byte* p = blocks[i].get();
    CHECK(p[0] == std::byte(i + 1));
    CHECK(p[sizes[i] - 1] == std::byte(i + 1));
  }
}

TEST_CASE("a chunk whose weights are all freed is unmapped", "[gemm][thp]") {
  // The cases before this one freed everything they allocated: this block opens a chunk.
  auto block = allocate_weight_bytes(4096);
  const void* address = block.get();
  REQUIRE(!smaps_of(address).empty());
  block.reset();
  CHECK(smaps_of(address).empty());  // the arena does not keep its newest chunk mapped
}

}  // namespace moert::cpu
