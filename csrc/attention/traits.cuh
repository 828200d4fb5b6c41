// Kernel traits: the one source of truth for tile sizes, warps and pipeline depth of
// every attention kernel, per (head_dim, element type, arch). Launchers, kernels and
// the shared-memory budget all read these; nothing else defines a tile size.
#pragma once

#include <cstdint>

namespace fastattn {
namespace attention {

// ---------------------------------------------------------------- sm80 (mma.sync)
//
// Forward and dQ: a block owns kBlockM query rows; warp w owns rows
// [w·kMTiles·16, (w+1)·kMTiles·16) and runs mma.sync m16n8k16 over them; key/value
// tiles of kBlockN rows stream through a kStages-deep cp.async ring in shared memory.
// dK/dV: a block owns kBlockN key rows (warp w owns kNTiles·16 of them) and streams
// query/dout tiles of kBlockM rows (of every head of the GQA group) through the ring.

template <int kHeadDim_, typename Element_, int kBlockM_, int kBlockN_, int kNWarps_, int kStages_>
struct QueryTileTraitsSm80 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStages = kStages_;
  static constexpr int kMTiles = kBlockM / (16 * kNWarps);  // 16-row mma tiles per warp
  static constexpr int kElementBytes = 2;
  static constexpr int kTileQBytes = kBlockM * kHeadDim * kElementBytes;
  static constexpr int kTileKVBytes = kBlockN * kHeadDim * kElementBytes;
  static_assert(kMTiles >= 1 && kBlockM == kMTiles * 16 * kNWarps, "kBlockM must be a multiple of 16 * kNWarps");
  static_assert(kBlockN % 16 == 0, "kBlockN must be a multiple of 16");
  static_assert(kHeadDim % 64 == 0, "the shared-memory swizzle needs head_dim a multiple of 64");
  static_assert(kStages >= 2, "the cp.async ring needs at least two stages");
};

// Forward: Q tile + a ring of (K, V) tiles.
template <int kHeadDim, typename Element>
struct FwdTraitsSm80;

template <typename Element>
struct FwdTraitsSm80<64, Element> : QueryTileTraitsSm80<64, Element, 128, 64, 4, 3> {
  using Base = QueryTileTraitsSm80<64, Element, 128, 64, 4, 3>;
  static constexpr int kSmemBytes = Base::kTileQBytes + Base::kStages * 2 * Base::kTileKVBytes;
};

template <typename Element>
struct FwdTraitsSm80<128, Element> : QueryTileTraitsSm80<128, Element, 128, 64, 8, 2> {
  using Base = QueryTileTraitsSm80<128, Element, 128, 64, 8, 2>;
  static constexpr int kSmemBytes = Base::kTileQBytes + Base::kStages * 2 * Base::kTileKVBytes;
};

// Backward, dQ program: Q and dO tiles + a ring of (K, V) tiles.
template <int kHeadDim, typename Element>
struct BwdDqTraitsSm80 : QueryTileTraitsSm80<kHeadDim, Element, 64, 64, 4, 2> {
  using Base = QueryTileTraitsSm80<kHeadDim, Element, 64, 64, 4, 2>;
  static constexpr int kSmemBytes = 2 * Base::kTileQBytes + Base::kStages * 2 * Base::kTileKVBytes;
};

// Backward, dK/dV program: K and V tiles + a ring of (Q, dO, lse, delta) tiles.
template <int kHeadDim_, typename Element_>
struct BwdDkdvTraitsSm80 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;    // query rows per streamed tile
  static constexpr int kBlockN = 128;   // key rows per block
  static constexpr int kNWarps = 8;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStages = 2;
  static constexpr int kNTiles = kBlockN / (16 * kNWarps);  // 16-key-row mma tiles per warp
  static constexpr int kElementBytes = 2;
  static constexpr int kTileKVBytes = kBlockN * kHeadDim * kElementBytes;
  static constexpr int kTileQBytes = kBlockM * kHeadDim * kElementBytes;
  static constexpr int kStageBytes = 2 * kTileQBytes + 2 * kBlockM * 4;  // Q, dO, lse, delta
  static constexpr int kSmemBytes = 2 * kTileKVBytes + kStages * kStageBytes;
  static_assert(kNTiles >= 1 && kBlockN == kNTiles * 16 * kNWarps, "kBlockN must be a multiple of 16 * kNWarps");
  static_assert(kBlockM % 16 == 0 && kHeadDim % 64 == 0, "tile shapes");
};

// Backward preprocessing (delta = rowsum(dO ∘ O) - dlse): rows per block.
struct BwdPreprocessTraits {
  static constexpr int kNThreads = 128;
};

// ---------------------------------------------------------------- sm90a (wgmma + TMA)
//
// Forward: one producer warpgroup issues TMA loads of Q and of a kStages-deep ring of
// (K, V) tiles, completing on mbarriers; kConsumerWarpgroups consumer warpgroups each
// own 64 query rows and run wgmma m64nNk16 with the accumulators in registers.
template <int kHeadDim, typename Element>
struct FwdTraitsSm90;

template <int kHeadDim_, typename Element_, int kBlockN_, int kStages_>
struct FwdTraitsSm90Base {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kBlockM = 64 * kConsumerWarpgroups;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr int kNThreads = 128 * (kConsumerWarpgroups + 1);
  static constexpr int kProducerRegisters = 24;   // setmaxnreg of the producer warpgroup
  static constexpr int kConsumerRegisters = 240;  // setmaxnreg of each consumer warpgroup
  static constexpr int kElementBytes = 2;
  static constexpr int kTileQBytes = kBlockM * kHeadDim * kElementBytes;
  static constexpr int kTileKVBytes = kBlockN * kHeadDim * kElementBytes;
  // Q, the K ring, the V ring, then the mbarriers (Q full, K/V full and empty per stage).
  static constexpr int kBarrierBytes = 8 * (1 + 3 * kStages);
  static constexpr int kSmemBytes = kTileQBytes + 2 * kStages * kTileKVBytes + kBarrierBytes + 1024;
  static_assert(kHeadDim % 64 == 0, "TMA boxes are 64 elements (128 bytes) wide");
};

template <typename Element>
struct FwdTraitsSm90<64, Element> : FwdTraitsSm90Base<64, Element, 128, 4> {};

template <typename Element>
struct FwdTraitsSm90<128, Element> : FwdTraitsSm90Base<128, Element, 128, 2> {};

}  // namespace attention
}  // namespace fastattn
