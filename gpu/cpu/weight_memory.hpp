#pragma once

// Memory for packed weights (private to the CPU backend and its tests).
//
// Decode streams every active weight from DRAM once per step: ~300 MB per F32 token of the
// bench checkpoint, ~1.7 GB per batch-16 step. In 4 KiB pages that is one TLB miss (a 2-D page
// walk in a VM) every 4 KiB; a plain AVX2 read of 512 MiB on this VM went 18 → 21 GB/s on one
// thread with 2 MiB pages. So packed matrices come from chunks that are 2 MiB aligned and
// advised MADV_HUGEPAGE (transparent huge pages are usually `madvise` only). Small matrices
// share a chunk, so 16-bit 1 MiB expert matrices sit in huge pages too.
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

// `num_bytes` (> 0) of zeroed memory, 64-byte aligned, in huge-page-advised memory when the
// kernel allows it. Throws std::bad_alloc when no memory can be mapped.
std::shared_ptr<std::byte> allocate_weight_bytes(std::size_t num_bytes);

}  // namespace moert::cpu
