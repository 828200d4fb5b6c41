// Launch template of the Hopper forward: tensor maps encoded on the host
// (cuTensorMapEncodeTiled, reached through the runtime's driver entry point so that
// nothing links libcuda), the __global__ entry point, grid and shared memory from the
// traits. Included only by the generated instantiations/*_sm90.cu.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include "attention/dispatch.h"
#include "attention/kernel_fwd_sm90.cuh"
#include "attention/launch.h"
#include "attention/traits.cuh"

namespace fastattn {
namespace attention {

template <typename Traits, bool IsCausal>
__global__ void __launch_bounds__(Traits::kNThreads, 1) attention_fwd_kernel_sm90(const __grid_constant__ FwdParamsSm90 params) {
#if FA_SM90_ENABLED
  extern __shared__ __align__(1024) char smem_raw[];
  // 128-byte swizzle atoms must start on 1024-byte boundaries.
  char* smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int m_block = IsCausal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  attention_fwd_block_sm90<Traits, IsCausal>(params, smem, m_block, blockIdx.y, blockIdx.z, threadIdx.x);
#elif defined(__CUDA_ARCH__)
  // Every device pass but sm_90a (sm_80, sm_90 without the "a" features wgmma and
  // setmaxnreg, PTX for a newer arch): no body. The host never launches it there
  // (api.cu reads sm90a_code_flag); if anything does, fail loudly rather than leave out
  // and lse unwritten.
  (void)params;
  __trap();
#else
  (void)params;
#endif
}

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// The 4-D map (head_dim, rows, heads, batch) of a (batch, heads, rows, head_dim) tensor,
// boxes of (64, box_rows, 1, 1) elements with the 128-byte swizzle. False when TMA cannot
// describe the tensor (dispatch.h's tma_view; api.cu checks that first) or the driver
// refuses it.
inline bool encode_tensor_map(CUtensorMap& map, const void* base, DType dtype, int batch, int heads, int rows,
                              int head_dim, int64_t batch_stride, int64_t head_stride, int64_t row_stride,
                              int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const TmaView view = tma_view(batch, heads, rows, head_dim, batch_stride, head_stride, row_stride);
  if (!view.describable) return false;
  const cuuint64_t* dims = view.dims;
  const cuuint64_t* strides = view.byte_strides;
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult result =
      encode(&map, dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
             const_cast<void*>(base), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS;
}

// cudaErrorNotSupported: TMA cannot describe these tensors (the caller runs the sm80 kernel).
template <int kHeadDim, typename Element, bool IsCausal>
cudaError_t run_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  using Traits = FwdTraitsSm90<kHeadDim, Element>;
  FwdParamsSm90 params;
  params.p = p;
  const bool encoded =
      encode_tensor_map(params.tma_q, p.q, p.dtype, p.batch, p.heads, p.seqlen_q, kHeadDim, p.q_batch_stride,
                        p.q_head_stride, p.q_row_stride, Traits::kBlockM) &&
      encode_tensor_map(params.tma_k, p.k, p.dtype, p.batch, p.kv_heads, p.seqlen_k, kHeadDim, p.k_batch_stride,
                        p.k_head_stride, p.k_row_stride, Traits::kBlockN) &&
      encode_tensor_map(params.tma_v, p.v, p.dtype, p.batch, p.kv_heads, p.seqlen_k, kHeadDim, p.v_batch_stride,
                        p.v_head_stride, p.v_row_stride, Traits::kBlockN);
  if (!encoded) return cudaErrorNotSupported;
  auto kernel = attention_fwd_kernel_sm90<Traits, IsCausal>;
  if (cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
      err != cudaSuccess) {
    return err;
  }
  const dim3 grid((p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM, p.heads, p.batch);
  kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace attention
}  // namespace fastattn
