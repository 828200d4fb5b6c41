// FlashAttention forward for Hopper (sm90a): TMA, wgmma, warp specialization.
//
// The math is the sm80 forward's (kernel_fwd_sm80.cuh): base-2 online softmax over key
// tiles, m' = max(m, max_j x_ij), l' = l·2^(m - m') + Σ_j 2^(x_ij - m'),
// acc' = acc·2^(m - m') + P V; o = acc / l, lse = ln2·(m + log2 l); 0 and -inf for a row
// that sees no key.
//
// A block owns kBlockM = 128 query rows and runs three warpgroups:
//   producer (warpgroup 0, setmaxnreg.dec): one thread issues the TMA loads of the Q tile
//     and of a kStages-deep ring of (K, V) tiles, each completing on a "full" mbarrier,
//     refilling a stage once the consumers arrive on its "empty" mbarrier;
//   consumers (warpgroups 1 and 2, setmaxnreg.inc): 64 query rows each. S = Q Kᵀ is
//     wgmma m64n128k16 with both operands in shared memory; P stays in registers as the
//     A operand of O += P V (wgmma with V N-major in shared memory). The GEMMs are issued
//     one tile ahead: S of tile i and P V of tile i - 1 run on the tensor cores while the
//     softmax of tile i waits only for S, so the exponentials of tile i overlap the
//     P V GEMM of tile i - 1.
// Shared tiles use the TMA / wgmma 128-byte swizzle: 64-element column blocks of
// 128-byte rows, 8-row atoms of 1024 bytes.
#pragma once

#include <cuda.h>

#include "attention/params.cuh"
#include "attention/primitives.cuh"
#include "attention/primitives_sm90.cuh"
#include "attention/tile_sm80.cuh"

namespace fastattn {
namespace attention {

// The kernel argument: the tensor maps of q, k and v (encoded on the host) and the params.
struct FwdParamsSm90 {
  CUtensorMap tma_q;  // (head_dim, seqlen_q, heads, batch), boxes (64, kBlockM, 1, 1)
  CUtensorMap tma_k;  // (head_dim, seqlen_k, kv_heads, batch), boxes (64, kBlockN, 1, 1)
  CUtensorMap tma_v;
  FwdParams p;
};

template <typename Traits, bool IsCausal>
FA_DEVICE void attention_fwd_block_sm90(const FwdParamsSm90& params, char* smem, int m_block, int head, int batch,
                                        int tid) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  constexpr int kColumnBlocks = kHeadDim / 64;
  constexpr int kConsumerThreads = 128 * Traits::kConsumerWarpgroups;
  static_assert(kBlockM == 128 && kBlockN == 128, "the wgmma shapes below are m64n128 per consumer warpgroup");
  const FwdParams& p = params.p;

  const int kv_head = head / p.heads_per_kv_head;
  const int row_begin = m_block * kBlockM;
  const int rows_valid = imin(kBlockM, p.seqlen_q - row_begin);
  int key_begin, key_end;
  visible_keys<IsCausal>(p, row_begin, row_begin + rows_valid - 1, key_begin, key_end);
  const int n_block_begin = key_begin / kBlockN;
  const int n_tiles = key_end > key_begin ? ceil_div(key_end, kBlockN) - n_block_begin : 0;

  // [kColumnBlocks][kBlockM][64] Q, then [kStages][kColumnBlocks][kBlockN][64] K and V.
  Element* s_q = reinterpret_cast<Element*>(smem);
  Element* s_k = s_q + kBlockM * kHeadDim;
  Element* s_v = s_k + kStages * kBlockN * kHeadDim;
  uint64_t* q_full = reinterpret_cast<uint64_t*>(s_v + kStages * kBlockN * kHeadDim);
  uint64_t* k_full = q_full + 1;
  uint64_t* v_full = k_full + kStages;
  uint64_t* kv_empty = v_full + kStages;

  if (tid == 0) {
    sm90::prefetch_tensor_map(&params.tma_q);
    sm90::prefetch_tensor_map(&params.tma_k);
    sm90::prefetch_tensor_map(&params.tma_v);
    sm90::mbarrier_init(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      sm90::mbarrier_init(&k_full[s], 1);
      sm90::mbarrier_init(&v_full[s], 1);
      sm90::mbarrier_init(&kv_empty[s], kConsumerThreads);
    }
    sm90::mbarrier_init_fence();
  }
  block_sync();

  const int warpgroup = tid / 128;
  if (warpgroup == 0) {
    // ------------------------------------------------------------ producer
    sm90::setmaxnreg_dec<Traits::kProducerRegisters>();
    if (tid == 0 && n_tiles > 0) {
      sm90::mbarrier_arrive_expect_tx(q_full, Traits::kTileQBytes);
#pragma unroll
      for (int c = 0; c < kColumnBlocks; ++c) {
        sm90::tma_load_4d(s_q + c * kBlockM * 64, &params.tma_q, q_full, c * 64, row_begin, head, batch);
      }
      for (int i = 0; i < n_tiles; ++i) {
        const int stage = i % kStages;
        const int key0 = (n_block_begin + i) * kBlockN;
        // Round r of a stage waits for the consumers' release of round r - 1 (parity of r - 1;
        // round 0 passes at once on a fresh barrier).
        sm90::mbarrier_wait(&kv_empty[stage], ((i / kStages) & 1) ^ 1);
        Element* tile_k = s_k + stage * kBlockN * kHeadDim;
        Element* tile_v = s_v + stage * kBlockN * kHeadDim;
        sm90::mbarrier_arrive_expect_tx(&k_full[stage], Traits::kTileKVBytes);
#pragma unroll
        for (int c = 0; c < kColumnBlocks; ++c) {
          sm90::tma_load_4d(tile_k + c * kBlockN * 64, &params.tma_k, &k_full[stage], c * 64, key0, kv_head, batch);
        }
        sm90::mbarrier_arrive_expect_tx(&v_full[stage], Traits::kTileKVBytes);
#pragma unroll
        for (int c = 0; c < kColumnBlocks; ++c) {
          sm90::tma_load_4d(tile_v + c * kBlockN * 64, &params.tma_v, &v_full[stage], c * 64, key0, kv_head, batch);
        }
      }
    }
  } else {
    // ------------------------------------------------------------ consumers
    sm90::setmaxnreg_inc<Traits::kConsumerRegisters>();
    const int consumer = warpgroup - 1;
    const int ltid = tid % 128;
    const int warp = ltid / 32, lane = ltid % 32;
    const int g = lane / 4, t = lane % 4;
    const int row_local = consumer * 64 + warp * 16 + g;  // this thread's rows: row_local, row_local + 8
    Element* out = static_cast<Element*>(p.out) + batch * p.out_batch_stride + head * p.out_head_stride +
                   row_begin * p.out_row_stride;
    float* lse = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride + row_begin;

    if (n_tiles == 0) {
      for (int c = ltid; c < 64 * kHeadDim / 8; c += 128) {
        const int row = consumer * 64 + c / (kHeadDim / 8);
        if (row < rows_valid) {
          *reinterpret_cast<Chunk*>(out + row * p.out_row_stride + (c % (kHeadDim / 8)) * 8) = Chunk{0, 0, 0, 0};
        }
      }
      if (ltid < 64 && consumer * 64 + ltid < rows_valid) lse[consumer * 64 + ltid] = -kInfinity;
      return;
    }

    auto q_desc = [&](int ks) {
      return sm90::smem_descriptor(s_q + (ks / 4) * kBlockM * 64 + consumer * 64 * 64 + (ks % 4) * 16, 16);
    };
    auto k_desc = [&](int stage, int ks) {
      return sm90::smem_descriptor(s_k + stage * kBlockN * kHeadDim + (ks / 4) * kBlockN * 64 + (ks % 4) * 16, 16);
    };
    auto v_desc = [&](int stage, int kk) {
      return sm90::smem_descriptor(s_v + stage * kBlockN * kHeadDim + kk * 16 * 64, kBlockN * 128);
    };

    float s[kBlockN / 2];       // S of one tile: element nt·4 + e at (row g + 8(e/2), column nt·8 + 2t + e%2)
    float acc_o[kHeadDim / 2];  // O, same layout over head_dim
    uint32_t p_frag[kBlockN / 16][4];  // P as the A operand of P V, one k-step (16 keys) each
    float row_max[2] = {-kInfinity, -kInfinity}, row_sum[2] = {0.f, 0.f}, correction[2];
#pragma unroll
    for (int i = 0; i < kHeadDim / 2; ++i) acc_o[i] = 0.f;
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) s[i] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) p_frag[kk][0] = p_frag[kk][1] = p_frag[kk][2] = p_frag[kk][3] = 0u;

    // The mbarrier waits come before the wgmma_fence that the GEMMs follow: nothing but
    // descriptor arithmetic lies between the fence and the wgmmas.
    auto wait_k = [&](int i) { sm90::mbarrier_wait(&k_full[i % kStages], (i / kStages) & 1); };
    auto wait_v = [&](int i) { sm90::mbarrier_wait(&v_full[i % kStages], (i / kStages) & 1); };
    // S = Q Kᵀ of tile i (K of tile i has landed).
    auto issue_s = [&](int i) {
      const int stage = i % kStages;
#pragma unroll
      for (int ks = 0; ks < kHeadDim / 16; ++ks) {
        sm90::wgmma_m64n128k16_ss<Element>(s, q_desc(ks), k_desc(stage, ks), ks > 0);
      }
      sm90::wgmma_commit();
    };
    // O += P V of tile i (V of tile i has landed).
    auto issue_pv = [&](int i) {
      const int stage = i % kStages;
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        if constexpr (kHeadDim == 64) {
          sm90::wgmma_m64n64k16_rs<Element>(acc_o, p_frag[kk], v_desc(stage, kk), 1);
        } else {
          sm90::wgmma_m64n128k16_rs<Element>(acc_o, p_frag[kk], v_desc(stage, kk), 1);
        }
      }
      sm90::wgmma_commit();
    };
    // Mask and exponentiate S of tile i in place; correction = 2^(m_old - m_new).
    auto softmax = [&](int i) {
      const int key0 = (n_block_begin + i) * kBlockN;
      const bool masked = tile_needs_mask<IsCausal>(p, row_begin, kBlockM, key0, kBlockN);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row_begin + row_local + 8 * half;
        float tile_max = row_max[half];
#pragma unroll
        for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float x = s[nt * 4 + 2 * half + e] * p.scale_log2;
            if (masked && !visible<IsCausal>(p, row, key0 + nt * 8 + 2 * t + e)) x = -kInfinity;
            s[nt * 4 + 2 * half + e] = x;
            tile_max = fmaxf(tile_max, x);
          }
        }
        tile_max = quad_max(tile_max);
        const float base = tile_max == -kInfinity ? 0.f : tile_max;
        correction[half] = exp2_approx(row_max[half] - base);
        row_max[half] = tile_max;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float prob = exp2_approx(s[nt * 4 + 2 * half + e] - base);
            s[nt * 4 + 2 * half + e] = prob;
            sum += prob;
          }
        }
        row_sum[half] = row_sum[half] * correction[half] + sum;
      }
    };
    // P (in s) -> p_frag, once no P V GEMM reads p_frag any more.
    auto pack_p = [&]() {
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        p_frag[kk][0] = ElementTraits<Element>::pack(s[8 * kk + 0], s[8 * kk + 1]);
        p_frag[kk][1] = ElementTraits<Element>::pack(s[8 * kk + 2], s[8 * kk + 3]);
        p_frag[kk][2] = ElementTraits<Element>::pack(s[8 * kk + 4], s[8 * kk + 5]);
        p_frag[kk][3] = ElementTraits<Element>::pack(s[8 * kk + 6], s[8 * kk + 7]);
      }
    };

    // Every register a wgmma reads or writes is settled before its wgmma_fence.
    auto fence_operands = [&]() {
      sm90::fence_registers(s);
      sm90::fence_registers(acc_o);
      sm90::fence_registers(p_frag);
    };

    sm90::mbarrier_wait(q_full, 0);
    wait_k(0);
    fence_operands();
    sm90::wgmma_fence();
    issue_s(0);
    sm90::wgmma_wait<0>();
    sm90::fence_registers(s);
    softmax(0);
    pack_p();
    for (int i = 1; i < n_tiles; ++i) {
      // S of tile i and P V of tile i - 1 on the tensor cores; the exponentials of tile i
      // as soon as its S is done; then, with P V done, rescale O and repack P.
      wait_k(i);
      wait_v(i - 1);
      fence_operands();
      sm90::wgmma_fence();
      issue_s(i);
      issue_pv(i - 1);
      sm90::wgmma_wait<1>();
      sm90::fence_registers(s);
      softmax(i);
      sm90::wgmma_wait<0>();
      sm90::fence_registers(acc_o);
      sm90::mbarrier_arrive(&kv_empty[(i - 1) % kStages]);
#pragma unroll
      for (int nt = 0; nt < kHeadDim / 8; ++nt) {
        acc_o[nt * 4 + 0] *= correction[0];
        acc_o[nt * 4 + 1] *= correction[0];
        acc_o[nt * 4 + 2] *= correction[1];
        acc_o[nt * 4 + 3] *= correction[1];
      }
      pack_p();
    }
    wait_v(n_tiles - 1);
    fence_operands();
    sm90::wgmma_fence();
    issue_pv(n_tiles - 1);
    sm90::wgmma_wait<0>();
    sm90::fence_registers(acc_o);

    // Epilogue: normalize, lse, stage O through the Q tile (every consumer is past its
    // last S GEMM after the named barrier), 16-byte stores.
    float inv[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float sum = quad_sum(row_sum[half]);
      inv[half] = sum > 0.f ? 1.f / sum : 0.f;
      const int row = row_local + 8 * half;
      if (t == 0 && row < rows_valid) lse[row] = sum > 0.f ? (row_max[half] + log2f(sum)) * kLn2 : -kInfinity;
    }
    sm90::named_barrier_sync<1, kConsumerThreads>();
#pragma unroll
    for (int nt = 0; nt < kHeadDim / 8; ++nt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        *reinterpret_cast<uint32_t*>(s_q + swizzle<kHeadDim>(row_local + 8 * half, nt) + 2 * t) =
            ElementTraits<Element>::pack(acc_o[nt * 4 + 2 * half] * inv[half], acc_o[nt * 4 + 2 * half + 1] * inv[half]);
      }
    }
    if (consumer == 0) {
      sm90::named_barrier_sync<2, 128>();
    } else {
      sm90::named_barrier_sync<3, 128>();
    }
    for (int c = ltid; c < 64 * kHeadDim / 8; c += 128) {
      const int row = consumer * 64 + c / (kHeadDim / 8), chunk = c % (kHeadDim / 8);
      if (row < rows_valid) {
        *reinterpret_cast<Chunk*>(out + row * p.out_row_stride + chunk * 8) =
            *reinterpret_cast<const Chunk*>(s_q + swizzle<kHeadDim>(row, chunk));
      }
    }
  }
}

}  // namespace attention
}  // namespace fastattn
