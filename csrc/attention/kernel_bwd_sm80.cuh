// FlashAttention-2 backward for sm80+, deterministic (no atomics): a dK/dV program per
// key tile and a dQ program per query tile, after a preprocessing pass.
//
// With the forward's lse, dO the output gradient and dlse the gradient of lse (0 if
// absent), per query row i and key j (P recomputed, never stored):
//     δ_i   = rowsum(dO_i ∘ o_i) - dlse_i                         (preprocess)
//     P_ij  = 2^(scale·log2(e)·q_i·k_j - log2(e)·lse_i)   (0 where j is not visible)
//     dP_ij = dO_i · v_j          dS_ij = P_ij (dP_ij - δ_i)
//     dV_j  = Σ_{h in group} Σ_i P_ij dO_i        dK_j = scale · Σ_{h in group} Σ_i dS_ij q_i
//     dQ_i  = scale · Σ_j dS_ij k_j
// A fully masked row has lse = -inf; it is read as +inf so that its P is 0.
//
// dK/dV program: K and V of kBlockN keys stay in shared memory; the Q, dO, lse and δ
// tiles of every query tile of every head of the GQA group stream through a cp.async
// ring. Each warp owns 16-key strips and computes Sᵀ = K Qᵀ and dPᵀ = V dOᵀ directly,
// so Pᵀ and dSᵀ are already in the accumulator layout that becomes the A operand of
// dV += Pᵀ dO and dK += dSᵀ Q. dQ program: the forward's structure with S = Q Kᵀ,
// dP = dO Vᵀ and dQ += dS K. Each output element is summed by one thread in a fixed
// order, so results are bitwise reproducible.
#pragma once

#include "attention/params.cuh"
#include "attention/primitives.cuh"
#include "attention/tile_sm80.cuh"

namespace fastattn {
namespace attention {

// lse in base 2 as the backward subtracts it; a fully masked row (-inf) becomes +inf.
FA_DEVICE float lse_to_log2(float lse) { return lse == -kInfinity ? kInfinity : lse * kLog2e; }

// δ for kRowsPerBlock rows: kHeadDim / 8 consecutive lanes share a row.
template <int kHeadDim, typename Element, int kNThreads>
FA_DEVICE void attention_bwd_preprocess_block(const BwdParams& p, int row_block, int head, int batch, int tid) {
  constexpr int kLanesPerRow = kHeadDim / 8;
  constexpr int kRowsPerBlock = kNThreads / kLanesPerRow;
  static_assert(32 % kLanesPerRow == 0, "a row's lanes stay within one warp");
  const int row = row_block * kRowsPerBlock + tid / kLanesPerRow;
  const int chunk = tid % kLanesPerRow;
  float dot = 0.f;
  if (row < p.seqlen_q) {
    const Element* dout = static_cast<const Element*>(p.dout) + batch * p.dout_batch_stride +
                          head * p.dout_head_stride + row * p.dout_row_stride + chunk * 8;
    const Element* out = static_cast<const Element*>(p.out) + batch * p.out_batch_stride +
                         head * p.out_head_stride + row * p.out_row_stride + chunk * 8;
    const Chunk dout_chunk = *reinterpret_cast<const Chunk*>(dout);
    const Chunk out_chunk = *reinterpret_cast<const Chunk*>(out);
    const uint32_t dout_words[4] = {dout_chunk.x, dout_chunk.y, dout_chunk.z, dout_chunk.w};
    const uint32_t out_words[4] = {out_chunk.x, out_chunk.y, out_chunk.z, out_chunk.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const float2 a = ElementTraits<Element>::unpack(dout_words[w]);
      const float2 b = ElementTraits<Element>::unpack(out_words[w]);
      dot += a.x * b.x + a.y * b.y;
    }
  }
#pragma unroll
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) dot += shfl_xor(dot, offset);
  if (chunk == 0 && row < p.seqlen_q) {
    if (p.dlse != nullptr) dot -= p.dlse[batch * p.dlse_batch_stride + head * p.dlse_head_stride + row];
    p.delta[batch * p.delta_batch_stride + head * p.delta_head_stride + row] = dot;
  }
}

template <typename Traits, bool IsCausal>
FA_DEVICE void attention_bwd_dq_block_sm80(const BwdParams& p, char* smem, int m_block, int head, int batch, int tid) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  constexpr int kMTiles = Traits::kMTiles;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr int kNTilesS = kBlockN / 8;
  constexpr int kNTilesD = kHeadDim / 8;

  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int kv_head = head / p.heads_per_kv_head;
  const int row_begin = m_block * kBlockM;
  const int rows_valid = imin(kBlockM, p.seqlen_q - row_begin);

  const Element* q = static_cast<const Element*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride +
                     row_begin * p.q_row_stride;
  const Element* dout = static_cast<const Element*>(p.dout) + batch * p.dout_batch_stride +
                        head * p.dout_head_stride + row_begin * p.dout_row_stride;
  const Element* k = static_cast<const Element*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride;
  Element* dq = static_cast<Element*>(p.dq) + batch * p.dq_batch_stride + head * p.dq_head_stride +
                row_begin * p.dq_row_stride;
  const float* lse = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride + row_begin;
  const float* delta = p.delta + batch * p.delta_batch_stride + head * p.delta_head_stride + row_begin;

  int key_begin, key_end;
  visible_keys<IsCausal>(p, row_begin, row_begin + rows_valid - 1, key_begin, key_end);
  if (key_end <= key_begin) {
    zero_rows<kBlockM, kHeadDim, kNThreads>(dq, p.dq_row_stride, rows_valid, tid);
    return;
  }
  const int n_block_begin = key_begin / kBlockN;
  const int n_tiles = ceil_div(key_end, kBlockN) - n_block_begin;

  Element* s_q = reinterpret_cast<Element*>(smem);
  Element* s_do = s_q + kBlockM * kHeadDim;
  auto s_k = [&](int stage) { return s_do + kBlockM * kHeadDim + stage * 2 * kBlockN * kHeadDim; };
  auto s_v = [&](int stage) { return s_k(stage) + kBlockN * kHeadDim; };
  auto load_kv = [&](int i) {
    const int key0 = (n_block_begin + i) * kBlockN;
    load_rows_async<kBlockN, kHeadDim, kNThreads>(s_k(i % kStages), k + key0 * p.k_row_stride, p.k_row_stride,
                                                  p.seqlen_k - key0, tid);
    load_rows_async<kBlockN, kHeadDim, kNThreads>(s_v(i % kStages), v + key0 * p.v_row_stride, p.v_row_stride,
                                                  p.seqlen_k - key0, tid);
  };
  load_rows_async<kBlockM, kHeadDim, kNThreads>(s_q, q, p.q_row_stride, rows_valid, tid);
  load_rows_async<kBlockM, kHeadDim, kNThreads>(s_do, dout, p.dout_row_stride, rows_valid, tid);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_kv(s);
    cp_async_commit();
  }

  float row_lse[kMTiles][2], row_delta[kMTiles][2];
  float acc_dq[kMTiles][kNTilesD][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = (warp * kMTiles + mt) * 16 + g + 8 * half;
      row_lse[mt][half] = row < rows_valid ? lse_to_log2(lse[row]) : kInfinity;
      row_delta[mt][half] = row < rows_valid ? delta[row] : 0.f;
    }
#pragma unroll
    for (int nt = 0; nt < kNTilesD; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dq[mt][nt][e] = 0.f;
    }
  }

  for (int i = 0; i < n_tiles; ++i) {
    cp_async_wait<kStages - 2>();
    block_sync();
    if (i + kStages - 1 < n_tiles) load_kv(i + kStages - 1);
    cp_async_commit();
    const Element* tile_k = s_k(i % kStages);
    const Element* tile_v = s_v(i % kStages);
    const int key0 = (n_block_begin + i) * kBlockN;

    // S = Q Kᵀ and dP = dO Vᵀ.
    float s[kMTiles][kNTilesS][4], dp[kMTiles][kNTilesS][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = dp[mt][nt][e] = 0.f;
      }
    }
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      uint32_t a_q[kMTiles][4], a_do[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        load_a<kHeadDim>(a_q[mt], s_q, (warp * kMTiles + mt) * 16, ks, lane);
        load_a<kHeadDim>(a_do[mt], s_do, (warp * kMTiles + mt) * 16, ks, lane);
      }
#pragma unroll
      for (int np = 0; np < kNTilesS / 2; ++np) {
        uint32_t b_k[4], b_v[4];
        load_b_nk<kHeadDim>(b_k, tile_k, np * 16, ks, lane);
        load_b_nk<kHeadDim>(b_v, tile_v, np * 16, ks, lane);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<Element>(s[mt][2 * np], a_q[mt], b_k[0], b_k[1]);
          mma_16816<Element>(s[mt][2 * np + 1], a_q[mt], b_k[2], b_k[3]);
          mma_16816<Element>(dp[mt][2 * np], a_do[mt], b_v[0], b_v[1]);
          mma_16816<Element>(dp[mt][2 * np + 1], a_do[mt], b_v[2], b_v[3]);
        }
      }
    }

    // dS = P ∘ (dP - δ), in place of S.
    const bool masked = tile_needs_mask<IsCausal>(p, row_begin, kBlockM, key0, kBlockN);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half = e / 2;
          const int row = row_begin + (warp * kMTiles + mt) * 16 + g + 8 * half;
          float prob = exp2_approx(s[mt][nt][e] * p.scale_log2 - row_lse[mt][half]);
          if (masked && !visible<IsCausal>(p, row, key0 + nt * 8 + 2 * t + e % 2)) prob = 0.f;
          s[mt][nt][e] = prob * (dp[mt][nt][e] - row_delta[mt][half]);
        }
      }
    }

    // dQ += dS K.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) accumulators_to_a<Element>(a[mt], s[mt][2 * kk], s[mt][2 * kk + 1]);
#pragma unroll
      for (int dpair = 0; dpair < kNTilesD / 2; ++dpair) {
        uint32_t b[4];
        load_b_kn<kHeadDim>(b, tile_k, kk, dpair * 16, lane);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<Element>(acc_dq[mt][2 * dpair], a[mt], b[0], b[1]);
          mma_16816<Element>(acc_dq[mt][2 * dpair + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }

  cp_async_wait<0>();
  block_sync();
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    accumulators_to_smem<kHeadDim>(s_q, acc_dq[mt], p.scale, (warp * kMTiles + mt) * 16, lane);
  }
  block_sync();
  store_rows<kBlockM, kHeadDim, kNThreads>(dq, p.dq_row_stride, rows_valid, s_q, tid);
}

template <typename Traits, bool IsCausal>
FA_DEVICE void attention_bwd_dkdv_block_sm80(const BwdParams& p, char* smem, int n_block, int kv_head, int batch,
                                             int tid) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  constexpr int kNTiles = Traits::kNTiles;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr int kQTiles = kBlockM / 8;     // n-tiles of a key strip of Sᵀ (query columns)
  constexpr int kNTilesD = kHeadDim / 8;
  static_assert(2 * kBlockM <= kNThreads, "one thread per lse and δ element of a stage");

  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int key_begin = n_block * kBlockN;
  const int keys_valid = imin(kBlockN, p.seqlen_k - key_begin);
  const int group = p.heads_per_kv_head;

  const Element* k = static_cast<const Element*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride +
                     key_begin * p.k_row_stride;
  const Element* v = static_cast<const Element*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride +
                     key_begin * p.v_row_stride;
  Element* dk = static_cast<Element*>(p.dk) + batch * p.dk_batch_stride + kv_head * p.dk_head_stride +
                key_begin * p.dk_row_stride;
  Element* dv = static_cast<Element*>(p.dv) + batch * p.dv_batch_stride + kv_head * p.dv_head_stride +
                key_begin * p.dv_row_stride;

  int query_begin, query_end;
  visible_queries<IsCausal>(p, key_begin, key_begin + keys_valid - 1, query_begin, query_end);
  if (query_end <= query_begin) {
    zero_rows<kBlockN, kHeadDim, kNThreads>(dk, p.dk_row_stride, keys_valid, tid);
    zero_rows<kBlockN, kHeadDim, kNThreads>(dv, p.dv_row_stride, keys_valid, tid);
    return;
  }
  const int m_block_begin = query_begin / kBlockM;
  const int m_tiles = ceil_div(query_end, kBlockM) - m_block_begin;
  const int n_iterations = group * m_tiles;  // (head of the group, query tile), head-major

  Element* s_k = reinterpret_cast<Element*>(smem);
  Element* s_v = s_k + kBlockN * kHeadDim;
  char* ring = reinterpret_cast<char*>(s_v + kBlockN * kHeadDim);
  auto s_q = [&](int stage) { return reinterpret_cast<Element*>(ring + stage * Traits::kStageBytes); };
  auto s_do = [&](int stage) { return s_q(stage) + kBlockM * kHeadDim; };
  auto s_lse = [&](int stage) { return reinterpret_cast<float*>(s_do(stage) + kBlockM * kHeadDim); };
  auto s_delta = [&](int stage) { return s_lse(stage) + kBlockM; };
  auto load_q = [&](int i) {
    const int head = kv_head * group + i / m_tiles;
    const int row0 = (m_block_begin + i % m_tiles) * kBlockM;
    const int stage = i % kStages;
    const int rows_valid = p.seqlen_q - row0;
    load_rows_async<kBlockM, kHeadDim, kNThreads>(
        s_q(stage),
        static_cast<const Element*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride + row0 * p.q_row_stride,
        p.q_row_stride, rows_valid, tid);
    load_rows_async<kBlockM, kHeadDim, kNThreads>(
        s_do(stage),
        static_cast<const Element*>(p.dout) + batch * p.dout_batch_stride + head * p.dout_head_stride +
            row0 * p.dout_row_stride,
        p.dout_row_stride, rows_valid, tid);
    if (tid < kBlockM) {
      const float* lse = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride + row0;
      cp_async_4(s_lse(stage) + tid, tid < rows_valid ? lse + tid : lse, tid < rows_valid);
    } else if (tid < 2 * kBlockM) {
      const int r = tid - kBlockM;
      const float* delta = p.delta + batch * p.delta_batch_stride + head * p.delta_head_stride + row0;
      cp_async_4(s_delta(stage) + r, r < rows_valid ? delta + r : delta, r < rows_valid);
    }
  };

  load_rows_async<kBlockN, kHeadDim, kNThreads>(s_k, k, p.k_row_stride, keys_valid, tid);
  load_rows_async<kBlockN, kHeadDim, kNThreads>(s_v, v, p.v_row_stride, keys_valid, tid);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_iterations) load_q(s);
    cp_async_commit();
  }

  float acc_dk[kNTiles][kNTilesD][4], acc_dv[kNTiles][kNTilesD][4];
#pragma unroll
  for (int kt = 0; kt < kNTiles; ++kt) {
#pragma unroll
    for (int nt = 0; nt < kNTilesD; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[kt][nt][e] = acc_dv[kt][nt][e] = 0.f;
    }
  }

  for (int i = 0; i < n_iterations; ++i) {
    cp_async_wait<kStages - 2>();
    block_sync();
    if (i + kStages - 1 < n_iterations) load_q(i + kStages - 1);
    cp_async_commit();
    const int stage = i % kStages;
    const Element* tile_q = s_q(stage);
    const Element* tile_do = s_do(stage);
    const float* tile_lse = s_lse(stage);
    const float* tile_delta = s_delta(stage);
    const int row0 = (m_block_begin + i % m_tiles) * kBlockM;

    // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for this warp's key strips.
    float st[kNTiles][kQTiles][4], dpt[kNTiles][kQTiles][4];
#pragma unroll
    for (int kt = 0; kt < kNTiles; ++kt) {
#pragma unroll
      for (int nt = 0; nt < kQTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) st[kt][nt][e] = dpt[kt][nt][e] = 0.f;
      }
    }
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      uint32_t a_k[kNTiles][4], a_v[kNTiles][4];
#pragma unroll
      for (int kt = 0; kt < kNTiles; ++kt) {
        load_a<kHeadDim>(a_k[kt], s_k, (warp * kNTiles + kt) * 16, ks, lane);
        load_a<kHeadDim>(a_v[kt], s_v, (warp * kNTiles + kt) * 16, ks, lane);
      }
#pragma unroll
      for (int np = 0; np < kQTiles / 2; ++np) {
        uint32_t b_q[4], b_do[4];
        load_b_nk<kHeadDim>(b_q, tile_q, np * 16, ks, lane);
        load_b_nk<kHeadDim>(b_do, tile_do, np * 16, ks, lane);
#pragma unroll
        for (int kt = 0; kt < kNTiles; ++kt) {
          mma_16816<Element>(st[kt][2 * np], a_k[kt], b_q[0], b_q[1]);
          mma_16816<Element>(st[kt][2 * np + 1], a_k[kt], b_q[2], b_q[3]);
          mma_16816<Element>(dpt[kt][2 * np], a_v[kt], b_do[0], b_do[1]);
          mma_16816<Element>(dpt[kt][2 * np + 1], a_v[kt], b_do[2], b_do[3]);
        }
      }
    }

    // Pᵀ in st, dSᵀ = Pᵀ ∘ (dPᵀ - δ) in dpt.
    const bool masked = tile_needs_mask<IsCausal>(p, row0, kBlockM, key_begin, kBlockN);
#pragma unroll
    for (int kt = 0; kt < kNTiles; ++kt) {
#pragma unroll
      for (int nt = 0; nt < kQTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key_begin + (warp * kNTiles + kt) * 16 + g + 8 * (e / 2);
          const int column = nt * 8 + 2 * t + e % 2;
          float prob = exp2_approx(st[kt][nt][e] * p.scale_log2 - lse_to_log2(tile_lse[column]));
          if (masked && !visible<IsCausal>(p, row0 + column, key)) prob = 0.f;
          st[kt][nt][e] = prob;
          dpt[kt][nt][e] = prob * (dpt[kt][nt][e] - tile_delta[column]);
        }
      }
    }

    // dV += Pᵀ dO and dK += dSᵀ Q.
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      uint32_t a_p[kNTiles][4], a_ds[kNTiles][4];
#pragma unroll
      for (int kt = 0; kt < kNTiles; ++kt) {
        accumulators_to_a<Element>(a_p[kt], st[kt][2 * kk], st[kt][2 * kk + 1]);
        accumulators_to_a<Element>(a_ds[kt], dpt[kt][2 * kk], dpt[kt][2 * kk + 1]);
      }
#pragma unroll
      for (int dpair = 0; dpair < kNTilesD / 2; ++dpair) {
        uint32_t b_do[4], b_q[4];
        load_b_kn<kHeadDim>(b_do, tile_do, kk, dpair * 16, lane);
        load_b_kn<kHeadDim>(b_q, tile_q, kk, dpair * 16, lane);
#pragma unroll
        for (int kt = 0; kt < kNTiles; ++kt) {
          mma_16816<Element>(acc_dv[kt][2 * dpair], a_p[kt], b_do[0], b_do[1]);
          mma_16816<Element>(acc_dv[kt][2 * dpair + 1], a_p[kt], b_do[2], b_do[3]);
          mma_16816<Element>(acc_dk[kt][2 * dpair], a_ds[kt], b_q[0], b_q[1]);
          mma_16816<Element>(acc_dk[kt][2 * dpair + 1], a_ds[kt], b_q[2], b_q[3]);
        }
      }
    }
  }

  cp_async_wait<0>();
  block_sync();
#pragma unroll
  for (int kt = 0; kt < kNTiles; ++kt) {
    accumulators_to_smem<kHeadDim>(s_k, acc_dk[kt], p.scale, (warp * kNTiles + kt) * 16, lane);
    accumulators_to_smem<kHeadDim>(s_v, acc_dv[kt], 1.f, (warp * kNTiles + kt) * 16, lane);
  }
  block_sync();
  store_rows<kBlockN, kHeadDim, kNThreads>(dk, p.dk_row_stride, keys_valid, s_k, tid);
  store_rows<kBlockN, kHeadDim, kNThreads>(dv, p.dv_row_stride, keys_valid, s_v, tid);
}

}  // namespace attention
}  // namespace fastattn
