// Declarations of the launchers, one explicit instantiation per (head_dim, dtype,
// causal, arch) in instantiations/ (written by generate_instantiations.py); api.cu
// dispatches to them.
#pragma once

#include <cuda_runtime.h>

#include "attention/params.cuh"

namespace fastattn {
namespace attention {

template <int kHeadDim, typename Element, bool IsCausal>
cudaError_t run_fwd_sm80(const FwdParams& params, cudaStream_t stream);

template <int kHeadDim, typename Element, bool IsCausal>
cudaError_t run_bwd_sm80(const BwdParams& params, cudaStream_t stream);

template <int kHeadDim, typename Element, bool IsCausal>
cudaError_t run_fwd_sm90(const FwdParams& params, cudaStream_t stream);

}  // namespace attention
}  // namespace fastattn
