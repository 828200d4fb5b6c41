// The arguments of the attention kernels: plain C++ (no CUDA or torch types), so that
// csrc/ops.cpp can fill them without CUDA headers and the kernels without torch headers.
//
// Layouts, with b = batch, h = heads, hk = kv_heads (h % hk == 0), sq/sk = sequence
// lengths, d = head_dim (the same for q, k and v):
//   q, out, dout, dq: (b, h, sq, d)     k, v, dk, dv: (b, hk, sk, d)
//   lse, delta: (b, h, sq) fp32
// Every tensor is addressed through its own batch, head and row strides (in elements);
// the head_dim stride is 1, the other strides are multiples of 8 elements and the base
// pointers 16-byte aligned (16-byte vector loads; ops.cpp checks this).
//
// Masking: key j is visible from query i iff
//     i + offset - window_left <= j <= i + offset + window_right,
// a negative window bound meaning unbounded on that side, with offset = sk - sq
// (bottom-right aligned, attention()) or 0 (top-left, scaled_dot_product_attention()).
// Causal is window_right = 0. The launcher normalizes windows that constrain nothing
// to -1, so a kernel instantiated with IsCausal = false never reads them.
#pragma once

#include <cstdint>

namespace fastattn {
namespace attention {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

struct FwdParams {
  const void* q;        // (b, h, sq, d)
  const void* k;        // (b, hk, sk, d)
  const void* v;        // (b, hk, sk, d)
  void* out;            // (b, h, sq, d)
  float* lse;           // (b, h, sq) natural-log logsumexp of the scaled scores

  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t out_batch_stride, out_head_stride, out_row_stride;
  int64_t lse_batch_stride, lse_head_stride;

  int batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim;
  int heads_per_kv_head;  // h / hk (GQA group size)
  DType dtype;

  float scale;       // softmax scale applied to q·k
  float scale_log2;  // scale · log2(e): scores are exponentiated in base 2
  int window_left;   // -1 = unbounded
  int window_right;  // -1 = unbounded; 0 = causal
  int offset;        // sk - sq (bottom-right) or 0 (top-left)
  bool is_causal;    // window_left >= 0 || window_right >= 0 (after normalization)
};

struct BwdParams : FwdParams {
  const void* dout;     // (b, h, sq, d)
  const float* dlse;    // (b, h, sq) or nullptr: gradient of lse
  void* dq;             // (b, h, sq, d)
  void* dk;             // (b, hk, sk, d): summed over the heads of each GQA group
  void* dv;             // (b, hk, sk, d)
  float* delta;         // (b, h, sq) workspace: rowsum(dout ∘ out) - dlse

  int64_t dout_batch_stride, dout_head_stride, dout_row_stride;
  int64_t dlse_batch_stride, dlse_head_stride;
  int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
  int64_t dk_batch_stride, dk_head_stride, dk_row_stride;
  int64_t dv_batch_stride, dv_head_stride, dv_row_stride;
  int64_t delta_batch_stride, delta_head_stride;
};

// Sets scale_log2, normalizes the window (a bound that constrains no (i, j) pair of
// these lengths becomes -1) and sets is_causal. Call after filling the rest.
inline void finalize_masking(FwdParams& p, bool top_left) {
  constexpr float kLog2e = 1.4426950408889634f;
  p.scale_log2 = p.scale * kLog2e;
  p.offset = top_left ? 0 : p.seqlen_k - p.seqlen_q;
  // j >= i + offset - left binds for some i < sq only if sq - 1 + offset - left > 0.
  if (p.window_left >= 0 && static_cast<int64_t>(p.seqlen_q) - 1 + p.offset - p.window_left <= 0) {
    p.window_left = -1;
  }
  // j <= i + offset + right binds for some j < sk only if offset + right < sk - 1.
  if (p.window_right >= 0 && static_cast<int64_t>(p.offset) + p.window_right >= p.seqlen_k - 1) {
    p.window_right = -1;
  }
  p.is_causal = p.window_left >= 0 || p.window_right >= 0;
}

}  // namespace attention
}  // namespace fastattn
