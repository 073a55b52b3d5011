#include "gpu/cpu/weight_memory.hpp"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>

namespace moert::cpu {

namespace {

// A chunk holds many matrices; a bigger one gets a mapping of its own.
constexpr std::size_t chunk_bytes = std::size_t{256} << 20;  // untouched tails cost no memory
constexpr std::size_t own_mapping_above = chunk_bytes / 4;
constexpr std::size_t alignment = 64;

// Read per mapping (a chunk is 256 MiB, so rarely), so a process may switch it for later loads.
bool huge_pages_wanted() {
  const char* env = std::getenv("MOERT_WEIGHT_HUGE_PAGES");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

// One anonymous mapping, 2 MiB aligned, advised for huge pages.
class mapping {
public:
  explicit mapping(std::size_t num_bytes) : bytes_((num_bytes + huge_page_bytes - 1) / huge_page_bytes * huge_page_bytes) {
    // Over-map by one huge page and trim both ends, so the start is 2 MiB aligned.
    const std::size_t span = bytes_ + huge_page_bytes;
    void* raw = ::mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED)
      throw std::bad_alloc{};
    const auto start = reinterpret_cast<std::uintptr_t>(raw);
    const std::uintptr_t aligned = (start + huge_page_bytes - 1) / huge_page_bytes * huge_page_bytes;
    if (aligned > start)
      ::munmap(raw, aligned - start);
    const std::uintptr_t end = start + span, used_end = aligned + bytes_;
    if (end > used_end)
      ::munmap(reinterpret_cast<void*>(used_end), end - used_end);
    base_ = reinterpret_cast<std::byte*>(aligned);
    // Advice only: without THP (or with it off) the memory is ordinary 4 KiB pages.
    if (huge_pages_wanted())
      ::madvise(base_, bytes_, MADV_HUGEPAGE);
  }
  ~mapping() { ::munmap(base_, bytes_); }
  mapping(const mapping&) = delete;
  mapping& operator=(const mapping&) = delete;

  std::byte* base() const { return base_; }
  std::size_t size() const { return bytes_; }

private:
  std::size_t bytes_;
  std::byte* base_ = nullptr;
};

class weight_arena {
public:
  std::shared_ptr<std::byte> allocate(std::size_t num_bytes) {
    const std::size_t rounded = (num_bytes + alignment - 1) / alignment * alignment;
    if (rounded > own_mapping_above) {
      auto own = std::make_shared<mapping>(rounded);
      return {own, own->base()};
    }
    std::lock_guard lock{mutex_};
    std::shared_ptr<mapping> chunk = current_.lock();
    if (!chunk || used_ + rounded > chunk->size()) {
      chunk = std::make_shared<mapping>(chunk_bytes);
      current_ = chunk;
      used_ = 0;
    }
    std::byte* p = chunk->base() + used_;
    used_ += rounded;
    return {chunk, p};  // aliasing: keeps the chunk mapped while p is in use
  }

private:
  std::mutex mutex_;
  std::weak_ptr<mapping> current_;  // weak: a chunk whose weights are all freed is unmapped
  std::size_t used_ = 0;
};

}  // namespace

std::shared_ptr<std::byte> allocate_weight_bytes(std::size_t num_bytes) {
  // Each allocation holds its own reference to its chunk, so the arena may go first at exit.
  static weight_arena arena;
  return arena.allocate(num_bytes);
}

}  // namespace moert::cpu
