#pragma once

// Private to the CPU backend and its tests: the per-ISA matmul kernels behind matmul().
//
// A kernel fills y for all rows and the columns of panels [panel_begin, panel_end). Each
// y element stays one fma chain over k from +0.0f, so kernels differ only in speed. 16-bit
// weights are widened to f32 in registers (exactly), which changes the bytes read, not the
// chain.
//
// The ISA translation units are compiled with different -m flags. Anything they share
// must be a template instantiated on a type local to that unit (or fully inlined), never
// an ordinary inline function: the linker keeps one copy of an inline function, and an
// AVX-512 copy would then run in the AVX2 or scalar path.

#include "gpu/cpu/gemm.hpp"

#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

namespace moert::cpu {

enum class gemm_kernel { scalar, avx2, avx512 };

const char* to_string(gemm_kernel kernel);
// Whether this CPU can run `kernel`.
bool gemm_kernel_supported(gemm_kernel kernel);
// The kernel matmul() uses: the best supported one, lowered by MOERT_GEMM_KERNEL.
gemm_kernel selected_gemm_kernel();
// matmul() with an explicit kernel, which must be supported.
void matmul_with(gemm_kernel kernel, const float* x, std::size_t num_rows,
                 const packed_matrix& w, float* y, thread_pool* pool);

// Weight element types as stored in the panels: float, or the raw bits of a 16-bit float.
// Plain structs (no member functions), so sharing them across ISA units is safe.
struct bf16_bits {
  std::uint16_t bits;
};
struct f16_bits {
  std::uint16_t bits;
};

// Plain values rather than a packed_matrix, so the ISA units call none of its inline members.
struct gemm_args {
  const float* x;
  std::size_t num_rows;
  const void* w;  // packed panels, packed_matrix::panel(0)
  dtype w_type;   // element type of w
  std::size_t k;  // w.cols()
  std::size_t n;  // w.rows()
  float* y;
};

// How matmul() and matmul_batch() split entries over a pool: one parallel_for over cost units.
// Entry i's panels lie end to end, each `cost` units long (its rows plus the weight-streaming
// term of matmul_work), so the pool's equal-count ranges give each thread about equal work even
// when a batch's experts hold very different numbers of rows. A range owns the panels that
// start in it: each panel runs in exactly one range, and a y element's bits never depend on
// which. Entries with no rows or no outputs are dropped. Used by gemm.cpp and tests only, never
// by the ISA units (its inline members are compiled without their -m flags).
class matmul_plan {
public:
  explicit matmul_plan(std::span<const matmul_entry> batch);

  std::size_t units() const { return units_; }
  // matmul_work of the whole batch, for parallel_for_if_worth.
  std::size_t work() const { return work_; }
  std::size_t num_entries() const { return entries_.size(); }
  // The cost of one panel of entry i, in units.
  std::size_t panel_cost(std::size_t i) const { return entries_[i].cost; }

  // fn(args, panel_begin, panel_end, entry) for each entry's panels starting in units [begin, end).
  template <class panels_fn>
  void for_each_in(std::size_t begin, std::size_t end, panels_fn fn) const {
    // The first entry ending after `begin`, then each entry starting before `end`.
    std::size_t lo = 0, hi = entries_.size();
    while (lo < hi) {
      std::size_t mid = (lo + hi) / 2;
      const entry& e = entries_[mid];
      if (e.first_unit + e.panels * e.cost <= begin)
        lo = mid + 1;
      else
        hi = mid;
    }
    for (std::size_t i = lo; i < entries_.size() && entries_[i].first_unit < end; ++i) {
      const entry& e = entries_[i];
      auto first_panel_at = [&](std::size_t u) {  // first panel starting at or after unit u
        std::size_t rel = u > e.first_unit ? u - e.first_unit : 0;
        std::size_t p = (rel + e.cost - 1) / e.cost;
        return p < e.panels ? p : e.panels;
      };
      std::size_t p0 = first_panel_at(begin), p1 = first_panel_at(end);
      if (p0 < p1)
        call(fn, e.args, p0, p1, i);
    }
  }

private:
  struct entry {
    gemm_args args;
    std::size_t first_unit, panels, cost;
  };
  template <class panels_fn>
  static void call(panels_fn& fn, const gemm_args& a, std::size_t p0, std::size_t p1, std::size_t i) {
    if constexpr (std::is_invocable_v<panels_fn&, const gemm_args&, std::size_t, std::size_t, std::size_t>)
      fn(a, p0, p1, i);
    else
      fn(a, p0, p1);
  }
  std::vector<entry> entries_;
  std::size_t units_ = 0, work_ = 0;
};

void matmul_panels_scalar(const gemm_args& a, std::size_t panel_begin, std::size_t panel_end);
void matmul_panels_avx2(const gemm_args& a, std::size_t panel_begin, std::size_t panel_end);
void matmul_panels_avx512(const gemm_args& a, std::size_t panel_begin, std::size_t panel_end);

// One register tile: rows × panels of y, over k in [0, k_count) relative to x and w.
struct gemm_tile {
  const float* x;            // first row, at the block's first k
  std::size_t x_stride;      // floats between rows of x
  const void* w;             // first panel, at the block's first k; elements of the tile's type
  std::size_t panel_stride;  // elements between panels
  std::size_t k_count;
  float* y;                  // first row, first column of the tile
  std::size_t y_stride;      // floats between rows of y
  std::size_t last_cols;     // valid columns of the last panel, 1..16
  bool resume;               // continue the chains from y instead of +0.0f
  // Weights the next panel group reads (same k offset, panel_stride apart), or null. A tile
  // may prefetch their rows k = prefetch_phase, prefetch_phase + prefetch_every, … so that
  // the group's row tiles between them pull the next panels from DRAM while they compute.
  const void* prefetch;
  std::size_t prefetch_panels, prefetch_phase, prefetch_every;
};

// Calls isa::tile<rows, panels, welem>(t) for run-time rows ≤ isa::max_rows,
// panels ≤ isa::max_panels.
template <class isa, class welem>
void dispatch_tile(std::size_t rows, std::size_t panels, const gemm_tile& t) {
  using tile_fn = void (*)(const gemm_tile&);
  struct tile_table {
    tile_fn fn[isa::max_rows * isa::max_panels];
  };
  constexpr std::size_t np = isa::max_panels;
  static constexpr tile_table table = []<std::size_t... i>(std::index_sequence<i...>) {
    return tile_table{{&isa::template tile<i / np + 1, i % np + 1, welem>...}};
  }(std::make_index_sequence<isa::max_rows * np>{});
  table.fn[(rows - 1) * np + panels - 1](t);
}

// Loop nest shared by the SIMD kernels. `isa` (local to its unit, see above) provides
// max_rows, max_panels, panels_for(rows), k_block(rows) and tile<rows, panels, welem>(t);
// `welem` is the weight element type (float, bf16_bits or f16_bits).
// Order: K blocks, then panel groups, then row tiles, so a group's K block of weights
// stays in L1/L2 while every row tile streams past it. Between K blocks the chains are
// parked in y as floats, which keeps each one a single sequential chain.
template <class isa, class welem>
void run_panel_tiles(const gemm_args& a, std::size_t panel_begin, std::size_t panel_end) {
  constexpr std::size_t pw = packed_matrix::panel_width;
  const std::size_t num_rows = a.num_rows, k_total = a.k, n_total = a.n;
  if (num_rows == 0)
    return;
  // Rows split into the fewest tiles of ≤ max_rows, as even as possible: a tile of 1-3 rows has
  // too few chains to hide the fma latency, so 32 rows run as 6,6,5,5,5,5, not 6,6,6,6,6,2.
  const std::size_t row_tiles = (num_rows + isa::max_rows - 1) / isa::max_rows;
  const std::size_t first_rows = (num_rows + row_tiles - 1) / row_tiles;  // the largest tile
  const std::size_t group = isa::panels_for(first_rows);
  const std::size_t k_block = isa::k_block(num_rows);
  for (std::size_t k0 = 0; k0 == 0 || k0 < k_total; k0 += k_block) {
    const std::size_t k_count = k_total - k0 < k_block ? k_total - k0 : k_block;
    for (std::size_t p = panel_begin; p < panel_end; p += group) {
      const std::size_t panels = panel_end - p < group ? panel_end - p : group;
      const std::size_t last_col0 = (p + panels - 1) * pw;
      gemm_tile t{};
      t.x_stride = k_total;
      t.w = static_cast<const welem*>(a.w) + (p * k_total + k0) * pw;
      t.panel_stride = k_total * pw;
      t.k_count = k_count;
      t.y_stride = n_total;
      t.last_cols = n_total - last_col0 < pw ? n_total - last_col0 : pw;
      t.resume = k0 != 0;
      // With several row tiles per group the weights are compute-bound from L2 after the first
      // tile, which alone would stream them from DRAM; spread that over all of them instead.
      // One tile of 4-6 rows gains from fetching the next group while it computes too (avx2, 1
      // thread, weights from DRAM: 6 rows 245-293 -> 205-238 us per 1024 x 1024); 1-3 rows are
      // bound by the stream itself, and there it cost up to 15 %.
      const std::size_t next = p + panels;
      t.prefetch = num_rows >= 4 && next < panel_end ? static_cast<const welem*>(a.w) + (next * k_total + k0) * pw
                                                    : nullptr;
      t.prefetch_panels = next >= panel_end ? 0 : panel_end - next < group ? panel_end - next : group;
      t.prefetch_every = row_tiles;
      for (std::size_t tile = 0, m = 0; tile < row_tiles; ++tile) {
        const std::size_t rows = num_rows / row_tiles + (tile < num_rows % row_tiles ? 1 : 0);
        t.prefetch_phase = tile;
        t.x = a.x + m * k_total + k0;
        t.y = a.y + m * n_total + p * pw;
        dispatch_tile<isa, welem>(rows, panels, t);
        m += rows;
      }
    }
  }
}

// run_panel_tiles for a.w_type.
template <class isa>
void run_panel_tiles_typed(const gemm_args& a, std::size_t panel_begin, std::size_t panel_end) {
  switch (a.w_type) {
  case dtype::f32:
    return run_panel_tiles<isa, float>(a, panel_begin, panel_end);
  case dtype::bf16:
    return run_panel_tiles<isa, bf16_bits>(a, panel_begin, panel_end);
  case dtype::f16:
    return run_panel_tiles<isa, f16_bits>(a, panel_begin, panel_end);
  }
}

}  // namespace moert::cpu
