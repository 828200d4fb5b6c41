// The fused FFN of the cuda backend: the GEMM-with-epilogue launcher (cuBLASLt) and our
// own elementwise kernels (bias + activation, its backward with the bias-gradient column
// sums, the gated SwiGLU / GeGLU activation and its backward). Plain C++ (no CUDA or torch
// headers): csrc/ops.cpp fills these structs from tensors and sequences the calls:
//
//   ffn forward:    H = x·W1ᵀ + b1 (GEMM, bias epilogue) -> A = act(H) -> y = A·W2ᵀ + b2
//   ffn backward:   dA = dy·W2 -> dH = dA ∘ act'(H), A = act(H), db1 partials
//                   -> dW2 = dyᵀA, dW1 = dHᵀx, dx = dH·W1, db2 = Σ dy
//   gated forward:  G = x·W_gateᵀ, U = x·W_upᵀ -> M = act(G) ∘ U -> y = M·W_downᵀ
//   gated backward: dM = dy·W_down -> dG = dM ∘ U ∘ act'(G), dU = dM ∘ act(G), M (over dM)
//                   -> dW_down = dyᵀM, dW_gate = dGᵀx, dW_up = dUᵀx, dx = dG·W_gate + dU·W_up
//
// Matrices are row-major (rows, cols) with contiguous columns and a row stride in elements.
#pragma once

#include <cstddef>
#include <cstdint>

#include "layer_norm/dtype.h"

namespace fastattn {

// gelu: x·Φ(x) (erf); gelu_tanh: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))); relu;
// silu: x·σ(x); identity (bias add only).
enum class Activation : int32_t { kGelu, kGeluTanh, kRelu, kSilu, kIdentity };

// out = act(hidden + bias); with bias and store_hidden, hidden + bias is written back into
// hidden (the pre-activation the backward reads).
struct ActFwdParams {
  void* hidden = nullptr;      // (rows, cols) pre-activation, in (and out with store_hidden)
  const void* bias = nullptr;  // (cols,) or nullptr
  void* out = nullptr;         // (rows, cols) activation; may alias hidden when !store_hidden
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t stride_hm = 0;  // hidden row stride
  int64_t stride_om = 0;  // out row stride
  bool store_hidden = false;
  Activation activation = Activation::kGelu;
  DType dtype = DType::kFloat32;
};

// dhidden = dout ∘ act'(hidden); out = act(hidden) when asked; fp32 column sums of dhidden
// (the bias gradient) into partial rows when asked.
struct ActBwdParams {
  const void* dout = nullptr;     // (rows, cols) gradient of act(hidden)
  const void* hidden = nullptr;   // (rows, cols) pre-activation
  void* dhidden = nullptr;        // (rows, cols) output; may alias dout
  void* out = nullptr;            // (rows, cols) act(hidden) recomputed, or nullptr
  float* dbias_partial = nullptr; // (ffn_partial_rows(rows), cols) fp32, or nullptr
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t stride_dom = 0;  // dout row stride
  int64_t stride_hm = 0;   // hidden row stride
  int64_t stride_dhm = 0;  // dhidden row stride
  int64_t stride_om = 0;   // out row stride
  Activation activation = Activation::kGelu;
  DType dtype = DType::kFloat32;
};

// mixed = act(gate) ∘ up.
struct GatedFwdParams {
  const void* gate = nullptr;  // (rows, cols)
  const void* up = nullptr;    // (rows, cols)
  void* mixed = nullptr;       // (rows, cols) output
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t stride_gm = 0;
  int64_t stride_um = 0;
  int64_t stride_mm = 0;
  Activation activation = Activation::kSilu;
  DType dtype = DType::kFloat32;
};

// dgate = dmixed ∘ up ∘ act'(gate), dup = dmixed ∘ act(gate); then mixed = act(gate) ∘ up is
// written over dmixed (its last use), for the dW_down GEMM.
struct GatedBwdParams {
  const void* gate = nullptr;  // (rows, cols)
  const void* up = nullptr;    // (rows, cols)
  void* dmixed = nullptr;      // (rows, cols) in: gradient of mixed; out: mixed
  void* dgate = nullptr;       // (rows, cols) output
  void* dup = nullptr;         // (rows, cols) output
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t stride_gm = 0;
  int64_t stride_um = 0;
  int64_t stride_mm = 0;   // dmixed / mixed row stride
  int64_t stride_dgm = 0;
  int64_t stride_dum = 0;
  Activation activation = Activation::kSilu;
  DType dtype = DType::kFloat32;
};

// fp32 column sums of x into partial rows (finish with reduce_partial_rows).
struct ColumnSumParams {
  const void* x = nullptr;   // (rows, cols)
  float* partial = nullptr;  // (ffn_partial_rows(rows), cols) fp32
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t stride_xm = 0;
  DType dtype = DType::kFloat32;
};

void ffn_act_fwd(const ActFwdParams& params, void* stream);
void ffn_act_bwd(const ActBwdParams& params, void* stream);
void gated_act_fwd(const GatedFwdParams& params, void* stream);
void gated_act_bwd(const GatedBwdParams& params, void* stream);
void column_sum(const ColumnSumParams& params, void* stream);

enum class GemmEpilogue : int32_t {
  kNone,         // D = op(A)·op(B) (+ beta·D)
  kBias,         // D = op(A)·op(B) + bias
  kGeluTanhAux,  // aux = op(A)·op(B) (+ bias when given), D = gelu_tanh(aux)
};

// Row-major D (m, n) = op(A) (m, k) · op(B) (k, n), fp32 accumulation, then the epilogue.
struct GemmParams {
  const void* a = nullptr;  // stored (m, k), or (k, m) with trans_a
  const void* b = nullptr;  // stored (k, n), or (n, k) with trans_b
  void* d = nullptr;        // (m, n)
  int64_t lda = 0;          // row strides in elements
  int64_t ldb = 0;
  int64_t ldd = 0;
  bool trans_a = false;
  bool trans_b = false;
  int64_t m = 0;
  int64_t n = 0;
  int64_t k = 0;
  float beta = 0.f;              // 0: overwrite D; 1: accumulate into D (epilogue kNone only)
  GemmEpilogue epilogue = GemmEpilogue::kNone;
  const void* bias = nullptr;    // (n,) for kBias (optional for kGeluTanhAux)
  void* aux = nullptr;           // kGeluTanhAux: the pre-activation (m, n)
  int64_t ld_aux = 0;            // its row stride: a multiple of 8 (cuBLASLt)
  DType dtype = DType::kFloat32; // A, B, D, bias and aux
  void* workspace = nullptr;     // FfnTraits::kGemmWorkspaceBytes on the device
  size_t workspace_bytes = 0;
};

// Runs the GEMM with cuBLASLt on `stream`. Returns false, launching nothing, when
// cuBLASLt offers no algorithm for it (the caller then falls back); throws on a failure.
bool gemm_lt(const GemmParams& params, void* stream);

}  // namespace fastattn
