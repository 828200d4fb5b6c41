// Layer norm and RMSNorm with a fused residual add, forward and backward: parameters and
// launchers. Plain C++ (no CUDA or torch headers): csrc/ops.cpp fills these structs from
// tensors, the .cu files launch. Semantics are those of python/fastattn/ops/layer_norm.py:
//
//   s = x + residual     rounded to residual_dtype and stored as residual_out (s = x
//                        without a residual); statistics in fp32
//   layer norm: y = (s - mean) * rstd * weight + bias,  rstd = 1 / sqrt(var(s) + eps)
//   RMSNorm:    y = s * rstd * weight,                  rstd = 1 / sqrt(mean(s^2) + eps)
//
// Tensors are (rows, hidden) with contiguous columns and any row stride (in elements);
// weight and bias are contiguous (hidden,).
#pragma once

#include <cstddef>
#include <cstdint>

#include "layer_norm/dtype.h"

namespace fastattn {

struct NormFwdParams {
  const void* x = nullptr;         // input, (rows, hidden), x_dtype
  const void* residual = nullptr;  // residual, (rows, hidden), residual_dtype; nullptr: s = x
  const void* weight = nullptr;    // (hidden,), weight_dtype; nullptr: 1
  const void* bias = nullptr;      // (hidden,), weight_dtype; nullptr: 0 (layer norm only)
  void* y = nullptr;               // output, (rows, hidden), x_dtype
  void* residual_out = nullptr;    // output s, (rows, hidden), residual_dtype; nullptr without residual
  float* mean = nullptr;           // output, (rows,) fp32; nullptr for RMSNorm
  float* rstd = nullptr;           // output 1 / std (1 / rms), (rows,) fp32
  int64_t rows = 0;
  int64_t hidden = 0;
  int64_t stride_xm = 0;  // x row stride
  int64_t stride_rm = 0;  // residual row stride
  int64_t stride_ym = 0;  // y row stride
  int64_t stride_om = 0;  // residual_out row stride
  float eps = 0.f;
  bool is_rms_norm = false;
  DType x_dtype = DType::kFloat32;         // x and y: float16, bfloat16 or float32
  DType residual_dtype = DType::kFloat32;  // residual and residual_out: x_dtype or float32
  DType weight_dtype = DType::kFloat32;    // weight and bias: x_dtype or float32
};

struct NormBwdParams {
  const void* dy = nullptr;             // gradient of y, (rows, hidden), x_dtype
  const void* dresidual_out = nullptr;  // gradient of residual_out, (rows, hidden), residual_dtype; or nullptr
  const void* s = nullptr;              // the normalized input saved by the forward, (rows, hidden), residual_dtype
  const void* weight = nullptr;         // (hidden,), weight_dtype; nullptr: 1
  const float* mean = nullptr;          // saved mean, (rows,); nullptr for RMSNorm
  const float* rstd = nullptr;          // saved rstd, (rows,)
  void* ds = nullptr;                   // output: gradient of s, (rows, hidden), residual_dtype
  void* dweight = nullptr;              // output, (hidden,), weight_dtype; nullptr without weight
  void* dbias = nullptr;                // output, (hidden,), weight_dtype; nullptr without bias
  float* dweight_partial = nullptr;     // workspace (plan.partial_rows, hidden) fp32; nullptr without weight
  float* dbias_partial = nullptr;       // workspace (plan.partial_rows, hidden) fp32; nullptr without bias
  int64_t rows = 0;
  int64_t hidden = 0;
  int64_t stride_dym = 0;  // dy row stride (0 for a broadcast row)
  int64_t stride_drm = 0;  // dresidual_out row stride
  int64_t stride_sm = 0;   // s row stride
  int64_t stride_dsm = 0;  // ds row stride
  bool is_rms_norm = false;
  DType x_dtype = DType::kFloat32;         // dy
  DType residual_dtype = DType::kFloat32;  // s, dresidual_out, ds
  DType weight_dtype = DType::kFloat32;    // weight, dweight, dbias
};

// How the backward runs; ops.cpp sizes the partial workspaces from partial_rows.
struct NormBwdPlan {
  bool warp_per_row = false;       // hidden <= NormTraits::kWarpHiddenMax
  bool vectorized = false;         // 16-byte accesses (aligned rows, hidden % vector == 0)
  bool cache_rows = false;         // block path: s and dy of the current row cached in shared memory
  bool smem_accumulators = false;  // block path: dw / db accumulate in shared memory, else in the partial rows
  int threads = 0;                 // threads per block
  int64_t blocks = 0;              // persistent grid; one partial row each
  size_t smem_bytes = 0;           // dynamic shared memory per block
  int64_t partial_rows = 0;        // rows of dweight_partial / dbias_partial
};

// Launch the forward on `stream` (a cudaStream_t). rows and hidden must be > 0.
void layer_norm_fwd(const NormFwdParams& params, void* stream);

// The backward's launch configuration (depends on the sizes, dtypes and the device only).
NormBwdPlan layer_norm_bwd_plan(const NormBwdParams& params);

// Launch the backward, then the reduction of the partials into dweight / dbias.
void layer_norm_bwd(const NormBwdParams& params, const NormBwdPlan& plan, void* stream);

// out[c] = sum over r of partial[r, c], summed in a fixed order (bitwise reproducible);
// partial is (partial_rows, cols) fp32 contiguous, out is (cols,) of out_dtype. Also used
// by the FFN bias gradients.
void reduce_partial_rows(const float* partial, int64_t partial_rows, int64_t cols, void* out, DType out_dtype,
                         void* stream);

}  // namespace fastattn
