// Launch template of the sm80 kernels: the __global__ entry points around the block
// bodies, grids and dynamic shared memory from the traits. Included only by the
// generated instantiation files (instantiations/*_sm80.cu), one (head_dim, dtype,
// causal) combination each.
#pragma once

#include <cuda_runtime.h>

#include "attention/kernel_bwd_sm80.cuh"
#include "attention/kernel_fwd_sm80.cuh"
#include "attention/launch.h"
#include "attention/traits.cuh"

namespace fastattn {
namespace attention {

template <typename Traits, bool IsCausal>
__global__ void __launch_bounds__(Traits::kNThreads) attention_fwd_kernel_sm80(const __grid_constant__ FwdParams p) {
  extern __shared__ __align__(128) char smem[];
  // Causal: the longest query tiles (the last ones) start first.
  const int m_block = IsCausal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  attention_fwd_block_sm80<Traits, IsCausal>(p, smem, m_block, blockIdx.y, blockIdx.z, threadIdx.x);
}

template <int kHeadDim, typename Element>
__global__ void __launch_bounds__(BwdPreprocessTraits::kNThreads)
    attention_bwd_preprocess_kernel(const __grid_constant__ BwdParams p) {
  attention_bwd_preprocess_block<kHeadDim, Element, BwdPreprocessTraits::kNThreads>(p, blockIdx.x, blockIdx.y,
                                                                                     blockIdx.z, threadIdx.x);
}

template <typename Traits, bool IsCausal>
__global__ void __launch_bounds__(Traits::kNThreads) attention_bwd_dq_kernel_sm80(const __grid_constant__ BwdParams p) {
  extern __shared__ __align__(128) char smem[];
  const int m_block = IsCausal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  attention_bwd_dq_block_sm80<Traits, IsCausal>(p, smem, m_block, blockIdx.y, blockIdx.z, threadIdx.x);
}

template <typename Traits, bool IsCausal>
__global__ void __launch_bounds__(Traits::kNThreads)
    attention_bwd_dkdv_kernel_sm80(const __grid_constant__ BwdParams p) {
  extern __shared__ __align__(128) char smem[];
  attention_bwd_dkdv_block_sm80<Traits, IsCausal>(p, smem, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x);
}

template <typename Kernel>
cudaError_t allow_shared_memory(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

inline int blocks_for(int n, int block) { return (n + block - 1) / block; }

template <int kHeadDim, typename Element, bool IsCausal>
cudaError_t run_fwd_sm80(const FwdParams& p, cudaStream_t stream) {
  using Traits = FwdTraitsSm80<kHeadDim, Element>;
  auto kernel = attention_fwd_kernel_sm80<Traits, IsCausal>;
  if (cudaError_t err = allow_shared_memory(kernel, Traits::kSmemBytes); err != cudaSuccess) return err;
  const dim3 grid(blocks_for(p.seqlen_q, Traits::kBlockM), p.heads, p.batch);
  kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <int kHeadDim, typename Element, bool IsCausal>
cudaError_t run_bwd_sm80(const BwdParams& p, cudaStream_t stream) {
  using DqTraits = BwdDqTraitsSm80<kHeadDim, Element>;
  using DkdvTraits = BwdDkdvTraitsSm80<kHeadDim, Element>;
  constexpr int kPreprocessRows = BwdPreprocessTraits::kNThreads / (kHeadDim / 8);
  attention_bwd_preprocess_kernel<kHeadDim, Element>
      <<<dim3(blocks_for(p.seqlen_q, kPreprocessRows), p.heads, p.batch), BwdPreprocessTraits::kNThreads, 0,
         stream>>>(p);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;

  auto dkdv = attention_bwd_dkdv_kernel_sm80<DkdvTraits, IsCausal>;
  if (cudaError_t err = allow_shared_memory(dkdv, DkdvTraits::kSmemBytes); err != cudaSuccess) return err;
  dkdv<<<dim3(blocks_for(p.seqlen_k, DkdvTraits::kBlockN), p.kv_heads, p.batch), DkdvTraits::kNThreads,
         DkdvTraits::kSmemBytes, stream>>>(p);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;

  auto dq = attention_bwd_dq_kernel_sm80<DqTraits, IsCausal>;
  if (cudaError_t err = allow_shared_memory(dq, DqTraits::kSmemBytes); err != cudaSuccess) return err;
  dq<<<dim3(blocks_for(p.seqlen_q, DqTraits::kBlockM), p.heads, p.batch), DqTraits::kNThreads, DqTraits::kSmemBytes,
       stream>>>(p);
  return cudaGetLastError();
}

}  // namespace attention
}  // namespace fastattn
