// Tile sizes of the FFN elementwise kernels and the cuBLASLt workspace: the one place
// they are set. Plain C++ (no CUDA headers), so csrc/ops.cpp sizes its buffers from the
// same numbers the launchers use.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastattn {

struct FfnTraits {
  // Elementwise kernels: a block is kColThreads × kRowThreads threads; thread (tx, ty)
  // handles the 16-byte vector blockIdx.x·kColThreads + tx of rows blockIdx.y·kRowThreads
  // + ty, stepping gridDim.y·kRowThreads rows.
  static constexpr int kColThreads = 32;
  static constexpr int kRowThreads = 8;
  // Kernels that also sum columns (bias gradients) launch at most this many row blocks;
  // each writes one fp32 partial row, reduced afterwards in a fixed order.
  static constexpr int64_t kPartialRowBlocks = 64;
  // Largest grid.y of the plain elementwise kernels.
  static constexpr int64_t kMaxRowBlocks = 65535;
  // cuBLASLt workspace per GEMM call.
  static constexpr size_t kGemmWorkspaceBytes = size_t(32) << 20;
};

// Row blocks (and so partial rows) of a column-summing kernel over `rows` rows.
inline int64_t ffn_partial_rows(int64_t rows) {
  int64_t blocks = (rows + FfnTraits::kRowThreads - 1) / FfnTraits::kRowThreads;
  if (blocks > FfnTraits::kPartialRowBlocks) blocks = FfnTraits::kPartialRowBlocks;
  return blocks < 1 ? 1 : blocks;
}

}  // namespace fastattn
