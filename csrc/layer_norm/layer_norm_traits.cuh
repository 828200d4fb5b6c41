// Tile sizes of the layer norm / RMSNorm kernels: the one place they are set. Plain C++
// (no CUDA headers), so csrc/ops.cpp and the launchers read the same numbers.
#pragma once

namespace fastattn {

struct NormTraits {
  // Rows of at most kWarpHiddenMax elements take a warp each, the whole row in registers
  // (kWarpHiddenMax / 32 elements per lane); wider rows take a block each.
  static constexpr int kWarpHiddenMax = 1024;
  // Warps per block on the warp-per-row path: rows in flight per block.
  static constexpr int kWarpRowsPerBlock = 4;
  // Threads of a block-per-row block: enough for about kBlockVecsPerThread 16-byte
  // vectors per thread, a multiple of 32 between these bounds.
  static constexpr int kBlockThreadsMin = 128;
  static constexpr int kBlockThreadsMax = 512;
  static constexpr int kBlockVecsPerThread = 4;
  // Most dynamic shared memory a block-per-row block uses (row cache, fp32 dweight /
  // dbias accumulators); the device's opt-in limit may be lower.
  static constexpr int kMaxSmemBytes = 160 * 1024;
  // Backward grid: at most this many resident blocks per SM are launched (persistent;
  // each block owns a contiguous range of rows and one fp32 partial row of dw / db).
  static constexpr int kBwdMaxBlocksPerSm = 8;
  // Warp-per-row backward: the register cap asks for this many resident blocks per SM.
  static constexpr int kWarpBwdMinBlocksPerSm = 4;
  // Reduction of the (partial_rows, hidden) fp32 partials: kReduceCols columns per block,
  // kReduceRows threads per column walking the partial rows.
  static constexpr int kReduceCols = 32;
  static constexpr int kReduceRows = 8;
};

}  // namespace fastattn
