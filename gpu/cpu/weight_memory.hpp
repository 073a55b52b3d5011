#pragma once

// Memory for packed weights (private to the CPU backend and its tests).
//
// Decode streams every active weight from DRAM once per step: ~300 MB per F32 token of the
// bench checkpoint, ~1.7 GB per batch-16 step. In 4 KiB pages that is one TLB miss (a 2-D page
// walk in a VM) every 4 KiB. Packed matrices therefore come from 2 MiB-aligned chunks, and
// with MOERT_WEIGHT_HUGE_PAGES=1 the chunks are advised MADV_HUGEPAGE (transparent huge pages
// are usually `madvise` only); small matrices share a chunk, so 16-bit 1 MiB expert matrices
// sit in huge pages too. Measured on this VM (one 1024 × 1024 F32 GEMV cycled over 384 MiB,
// avx2, 1 thread, in-process A/B, load 0.1-0.2): 18.3 → 20.4 GB/s at 1 row, 17.4 → 19.1 at 2,
// 13.6 → 15.0 at 4, unchanged at 16; 2 threads too noisy to tell.
//
// Off by default because of its cost here: the first touch of a huge page zeroes 2 MiB at
// once, and on this Firecracker VM that ran at 1-20 s per GB (4 KiB pages: ~1 s per GB), so
// loading the 1.7 GB F32 bench checkpoint took 28-35 s instead of 7-8 and
// tests/model/weights_16bit 25-31 s instead of 7-8.
//
// Ownership: allocate() returns a shared_ptr to the bytes that keeps their chunk mapped; a
// chunk is unmapped when its last allocation is released. Freed space inside a live chunk is
// not reused (weights live as long as their model). Resident cost beyond the bytes asked for:
// at most one partly used 2 MiB page per chunk.
// Thread safety: allocate() may be called from any thread.

#include <cstddef>
#include <memory>

namespace moert::cpu {

// Bytes of one huge page, the chunks' alignment.
inline constexpr std::size_t huge_page_bytes = std::size_t{2} << 20;

// `num_bytes` (> 0) of zeroed memory, 64-byte aligned; in huge-page-advised memory when
// MOERT_WEIGHT_HUGE_PAGES is "1" as the chunk holding it is mapped. Throws std::bad_alloc when no memory can be mapped.
std::shared_ptr<std::byte> allocate_weight_bytes(std::size_t num_bytes);

}  // namespace moert::cpu
