// Tile-level building blocks of the sm80 kernels: asynchronous (rows, kCols) tile loads
// into the swizzled shared-memory layout, ldmatrix addressing of mma.sync operands,
// accumulator -> operand conversion, masking and the epilogue stores.
//
// mma.sync m16n8k16 fragments (g = lane / 4, t = lane % 4):
//   A (16x16): a[r] holds rows g + 8(r%2), columns 8(r/2) + 2t + {0,1}
//   B (16x8):  b[r] holds rows (k) 8r + 2t + {0,1}, column (n) g
//   C (16x8):  c[e] is row g + 8(e/2), column 2t + e%2
#pragma once

#include <cstdint>

#include "attention/params.cuh"
#include "attention/primitives.cuh"

namespace fastattn {
namespace attention {

constexpr float kInfinity = __builtin_huge_valf();
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;

FA_DEVICE int ceil_div(int a, int b) { return (a + b - 1) / b; }
FA_DEVICE int imax(int a, int b) { return a > b ? a : b; }
FA_DEVICE int imin(int a, int b) { return a < b ? a : b; }

// Issues the cp.async copies of rows [0, kRows) of a (rows, kCols) global tile into the
// swizzled shared tile; rows >= rows_valid are zero-filled and not read.
template <int kRows, int kCols, int kThreads, typename Element>
FA_DEVICE void load_rows_async(Element* smem, const Element* gmem, int64_t row_stride, int rows_valid, int tid) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c / kChunksPerRow, chunk = c % kChunksPerRow;
    const bool valid = row < rows_valid;
    const Element* src = valid ? gmem + row * row_stride + chunk * 8 : gmem;
    cp_async_16(smem + swizzle<kCols>(row, chunk), src, valid);
  }
}

// Copies rows [0, rows_valid) of a swizzled shared tile to global memory.
template <int kRows, int kCols, int kThreads, typename Element>
FA_DEVICE void store_rows(Element* gmem, int64_t row_stride, int rows_valid, const Element* smem, int tid) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c / kChunksPerRow, chunk = c % kChunksPerRow;
    if (row < rows_valid) {
      *reinterpret_cast<Chunk*>(gmem + row * row_stride + chunk * 8) =
          *reinterpret_cast<const Chunk*>(smem + swizzle<kCols>(row, chunk));
    }
  }
}

// Writes zeros to rows [0, rows_valid) of a (kRows, kCols) global tile.
template <int kRows, int kCols, int kThreads, typename Element>
FA_DEVICE void zero_rows(Element* gmem, int64_t row_stride, int rows_valid, int tid) {
  constexpr int kChunksPerRow = kCols / 8;
  for (int c = tid; c < kRows * kChunksPerRow; c += kThreads) {
    const int row = c / kChunksPerRow, chunk = c % kChunksPerRow;
    if (row < rows_valid) *reinterpret_cast<Chunk*>(gmem + row * row_stride + chunk * 8) = Chunk{0, 0, 0, 0};
  }
}

// A operand of one k-step (16 columns) for rows [row0, row0 + 16) of a row-major tile.
template <int kCols, typename Element>
FA_DEVICE void load_a(uint32_t (&a)[4], const Element* tile, int row0, int kstep, int lane) {
  ldmatrix_x4(a, tile + swizzle<kCols>(row0 + (lane & 15), kstep * 2 + (lane >> 4)));
}

// B operands of one k-step for two n-tiles [n0, n0 + 16) of a tile stored (n, k), i.e.
// with the reduction dimension contiguous: b[0], b[1] for n-tile n0, b[2], b[3] for n0 + 8.
template <int kCols, typename Element>
FA_DEVICE void load_b_nk(uint32_t (&b)[4], const Element* tile, int n0, int kstep, int lane) {
  ldmatrix_x4(b, tile + swizzle<kCols>(n0 + (lane & 7) + ((lane >> 4) << 3), kstep * 2 + ((lane >> 3) & 1)));
}

// B operands of k-step `kstep` (rows 16·kstep..) for two n-tiles [n0, n0 + 16) of a tile
// stored (k, n), i.e. with the output dimension contiguous (transposed by ldmatrix).
template <int kCols, typename Element>
FA_DEVICE void load_b_kn(uint32_t (&b)[4], const Element* tile, int kstep, int n0, int lane) {
  ldmatrix_x4_trans(b, tile + swizzle<kCols>(kstep * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), (n0 >> 3) + (lane >> 4)));
}

// The A operand of one k-step from the fp32 accumulators of two adjacent n-tiles.
template <typename Element>
FA_DEVICE void accumulators_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = ElementTraits<Element>::pack(c0[0], c0[1]);
  a[1] = ElementTraits<Element>::pack(c0[2], c0[3]);
  a[2] = ElementTraits<Element>::pack(c1[0], c1[1]);
  a[3] = ElementTraits<Element>::pack(c1[2], c1[3]);
}

// acc[nt] (16 rows from row0, kCols columns) · scale -> the swizzled shared tile.
template <int kCols, typename Element>
FA_DEVICE void accumulators_to_smem(Element* tile, const float (&acc)[kCols / 8][4], float scale, int row0, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < kCols / 8; ++nt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + g + 8 * half;
      *reinterpret_cast<uint32_t*>(tile + swizzle<kCols>(row, nt) + 2 * t) =
          ElementTraits<Element>::pack(acc[nt][2 * half] * scale, acc[nt][2 * half + 1] * scale);
    }
  }
}

// The masking rule of params.cuh, plus the sequence ends.
template <bool IsCausal>
FA_DEVICE bool visible(const FwdParams& p, int row, int col) {
  if (col >= p.seqlen_k || row >= p.seqlen_q) return false;
  if constexpr (IsCausal) {
    if (p.window_left >= 0 && col < row + p.offset - p.window_left) return false;
    if (p.window_right >= 0 && col > row + p.offset + p.window_right) return false;
  }
  return true;
}

// Whether some (row, col) of rows [row0, row0 + rows) x cols [col0, col0 + cols) is
// not visible (then the tile is masked element by element).
template <bool IsCausal>
FA_DEVICE bool tile_needs_mask(const FwdParams& p, int row0, int rows, int col0, int cols) {
  if (col0 + cols > p.seqlen_k || row0 + rows > p.seqlen_q) return true;
  if constexpr (IsCausal) {
    if (p.window_left >= 0 && col0 < row0 + rows - 1 + p.offset - p.window_left) return true;
    if (p.window_right >= 0 && col0 + cols - 1 > row0 + p.offset + p.window_right) return true;
  }
  return false;
}

// Key range [begin, end) that rows [row_first, row_last] can see (end <= begin: none).
template <bool IsCausal>
FA_DEVICE void visible_keys(const FwdParams& p, int row_first, int row_last, int& begin, int& end) {
  begin = 0;
  end = p.seqlen_k;
  if constexpr (IsCausal) {
    if (p.window_left >= 0) begin = imax(0, row_first + p.offset - p.window_left);
    if (p.window_right >= 0) end = imin(p.seqlen_k, row_last + p.offset + p.window_right + 1);
  }
}

// Query range [begin, end) that can see some key of [key_first, key_last].
template <bool IsCausal>
FA_DEVICE void visible_queries(const FwdParams& p, int key_first, int key_last, int& begin, int& end) {
  begin = 0;
  end = p.seqlen_q;
  if constexpr (IsCausal) {
    if (p.window_right >= 0) begin = imax(0, key_first - p.offset - p.window_right);
    if (p.window_left >= 0) end = imin(p.seqlen_q, key_last - p.offset + p.window_left + 1);
  }
}

FA_DEVICE float quad_max(float x) {
  x = fmaxf(x, shfl_xor(x, 1));
  return fmaxf(x, shfl_xor(x, 2));
}

FA_DEVICE float quad_sum(float x) {
  x += shfl_xor(x, 1);
  return x + shfl_xor(x, 2);
}

}  // namespace attention
}  // namespace fastattn
