// FlashAttention-2 forward for sm80+ (mma.sync, ldmatrix, cp.async).
//
// Per (batch b, head h, kv head h / group), query row i, key j, with x_ij the scaled
// score in base 2 (x_ij = scale·log2(e)·q_i·k_j, -inf where j is not visible from i):
//     m_i = max_j x_ij          l_i = Σ_j 2^(x_ij - m_i)
//     o_i = Σ_j 2^(x_ij - m_i) v_j / l_i        lse_i = ln2 · (m_i + log2 l_i)
// computed over key tiles with the online rescaling (m' = max(m, max_j x_ij)):
//     l' = l·2^(m - m') + Σ_j 2^(x_ij - m'),     acc' = acc·2^(m - m') + P~ V
// A row that sees no key has l = 0: o = 0, lse = -inf.
//
// One block owns kBlockM query rows (warp w owns kMTiles 16-row strips); Q is loaded
// once into shared memory, K/V tiles stream through a kStages-deep cp.async ring. S
// = Q Kᵀ and P V run on mma.sync with fp32 accumulators; the softmax statistics live
// in registers (one row half per quad of lanes), P is converted to the A operand of
// P V in registers without touching shared memory.
#pragma once

#include "attention/params.cuh"
#include "attention/primitives.cuh"
#include "attention/tile_sm80.cuh"

namespace fastattn {
namespace attention {

template <typename Traits, bool IsCausal>
FA_DEVICE void attention_fwd_block_sm80(const FwdParams& p, char* smem, int m_block, int head, int batch, int tid) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  constexpr int kMTiles = Traits::kMTiles;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr int kNTilesS = kBlockN / 8;    // n-tiles of a row strip of S
  constexpr int kNTilesO = kHeadDim / 8;   // n-tiles of a row strip of O

  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int kv_head = head / p.heads_per_kv_head;
  const int row_begin = m_block * kBlockM;
  const int rows_valid = imin(kBlockM, p.seqlen_q - row_begin);

  const Element* q = static_cast<const Element*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride +
                     row_begin * p.q_row_stride;
  const Element* k = static_cast<const Element*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride;
  Element* out = static_cast<Element*>(p.out) + batch * p.out_batch_stride + head * p.out_head_stride +
                 row_begin * p.out_row_stride;
  float* lse = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride + row_begin;

  int key_begin, key_end;
  visible_keys<IsCausal>(p, row_begin, row_begin + rows_valid - 1, key_begin, key_end);
  if (key_end <= key_begin) {
    zero_rows<kBlockM, kHeadDim, kNThreads>(out, p.out_row_stride, rows_valid, tid);
    for (int r = tid; r < rows_valid; r += kNThreads) lse[r] = -kInfinity;
    return;
  }
  const int n_block_begin = key_begin / kBlockN;
  const int n_tiles = ceil_div(key_end, kBlockN) - n_block_begin;

  Element* s_q = reinterpret_cast<Element*>(smem);
  auto s_k = [&](int stage) { return s_q + kBlockM * kHeadDim + stage * 2 * kBlockN * kHeadDim; };
  auto s_v = [&](int stage) { return s_k(stage) + kBlockN * kHeadDim; };
  auto load_kv = [&](int i) {
    const int key0 = (n_block_begin + i) * kBlockN;
    load_rows_async<kBlockN, kHeadDim, kNThreads>(s_k(i % kStages), k + key0 * p.k_row_stride, p.k_row_stride,
                                                  p.seqlen_k - key0, tid);
    load_rows_async<kBlockN, kHeadDim, kNThreads>(s_v(i % kStages), v + key0 * p.v_row_stride, p.v_row_stride,
                                                  p.seqlen_k - key0, tid);
  };

  // Q travels in the first group, with K/V tile 0.
  load_rows_async<kBlockM, kHeadDim, kNThreads>(s_q, q, p.q_row_stride, rows_valid, tid);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_kv(s);
    cp_async_commit();
  }

  float acc_o[kMTiles][kNTilesO][4];
  float row_max[kMTiles][2], row_sum[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNTilesO; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][nt][e] = 0.f;
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      row_max[mt][half] = -kInfinity;
      row_sum[mt][half] = 0.f;
    }
  }

  for (int i = 0; i < n_tiles; ++i) {
    // Tile i has landed and every warp is done with tile i - 1, whose stage is refilled.
    cp_async_wait<kStages - 2>();
    block_sync();
    if (i + kStages - 1 < n_tiles) load_kv(i + kStages - 1);
    cp_async_commit();
    const Element* tile_k = s_k(i % kStages);
    const Element* tile_v = s_v(i % kStages);
    const int key0 = (n_block_begin + i) * kBlockN;

    // S = Q Kᵀ for this warp's rows.
    float s[kMTiles][kNTilesS][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
      }
    }
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) load_a<kHeadDim>(a[mt], s_q, (warp * kMTiles + mt) * 16, ks, lane);
#pragma unroll
      for (int np = 0; np < kNTilesS / 2; ++np) {
        uint32_t b[4];
        load_b_nk<kHeadDim>(b, tile_k, np * 16, ks, lane);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<Element>(s[mt][2 * np], a[mt], b[0], b[1]);
          mma_16816<Element>(s[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }

    // Online softmax: mask, scale to base 2, rescale the running statistics.
    const bool masked = tile_needs_mask<IsCausal>(p, row_begin, kBlockM, key0, kBlockN);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row_begin + (warp * kMTiles + mt) * 16 + g + 8 * half;
        float tile_max = row_max[mt][half];
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float x = s[mt][nt][2 * half + e] * p.scale_log2;
            if (masked && !visible<IsCausal>(p, row, key0 + nt * 8 + 2 * t + e)) x = -kInfinity;
            s[mt][nt][2 * half + e] = x;
            tile_max = fmaxf(tile_max, x);
          }
        }
        tile_max = quad_max(tile_max);
        const float base = tile_max == -kInfinity ? 0.f : tile_max;
        const float correction = exp2_approx(row_max[mt][half] - base);
        row_max[mt][half] = tile_max;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float prob = exp2_approx(s[mt][nt][2 * half + e] - base);
            s[mt][nt][2 * half + e] = prob;
            sum += prob;
          }
        }
        row_sum[mt][half] = row_sum[mt][half] * correction + sum;
#pragma unroll
        for (int nt = 0; nt < kNTilesO; ++nt) {
          acc_o[mt][nt][2 * half] *= correction;
          acc_o[mt][nt][2 * half + 1] *= correction;
        }
      }
    }

    // O += P V, P taken from the accumulators of S.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) accumulators_to_a<Element>(a[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < kNTilesO / 2; ++dp) {
        uint32_t b[4];
        load_b_kn<kHeadDim>(b, tile_v, kk, dp * 16, lane);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<Element>(acc_o[mt][2 * dp], a[mt], b[0], b[1]);
          mma_16816<Element>(acc_o[mt][2 * dp + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }

  // Epilogue: normalize, write lse, stage O through the (now free) Q tile.
  cp_async_wait<0>();
  block_sync();
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    const int row0 = (warp * kMTiles + mt) * 16;
    float inv[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float sum = quad_sum(row_sum[mt][half]);
      inv[half] = sum > 0.f ? 1.f / sum : 0.f;
      const int row = row0 + g + 8 * half;
      if (t == 0 && row < rows_valid) {
        lse[row] = sum > 0.f ? (row_max[mt][half] + log2f(sum)) * kLn2 : -kInfinity;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kNTilesO; ++nt) {
      acc_o[mt][nt][0] *= inv[0];
      acc_o[mt][nt][1] *= inv[0];
      acc_o[mt][nt][2] *= inv[1];
      acc_o[mt][nt][3] *= inv[1];
    }
    accumulators_to_smem<kHeadDim>(s_q, acc_o[mt], 1.f, row0, lane);
  }
  block_sync();
  store_rows<kBlockM, kHeadDim, kNThreads>(out, p.out_row_stride, rows_valid, s_q, tid);
}

}  // namespace attention
}  // namespace fastattn
