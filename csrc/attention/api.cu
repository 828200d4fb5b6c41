// Host entry points of the attention kernels: pick the instantiation for the current
// device's arch and the call's (head_dim, dtype, causal), check the shared-memory
// budget, launch.
//
// The forward runs the Hopper kernel on sm90 and the sm80 kernel elsewhere (and on sm90
// where TMA cannot describe the tensors); FASTATTN_ATTENTION_CUDA_KERNEL=sm80 pins the
// sm80 forward on sm90 too (tests and benchmarks compare the two).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "attention/api.h"
#include "attention/instantiations/head_dims.h"
#include "attention/launch.h"
#include "attention/traits.cuh"

namespace fastattn {
namespace attention {
namespace {

thread_local std::string last_message;

const char* fail(std::string message) {
  last_message = std::move(message);
  return last_message.c_str();
}

const char* from_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return nullptr;
  return fail(std::string(what) + ": " + cudaGetErrorString(err));
}

struct Device {
  int arch = 0;             // 10·major + minor
  int smem_per_block = 0;   // opt-in limit of dynamic shared memory per block
};

cudaError_t current_device(Device& device) {
  int index = 0, major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&index);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, index);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, index);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&device.smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, index);
  }
  device.arch = 10 * major + minor;
  return err;
}

const char* check_shared_memory(const Device& device, int bytes, const char* kernel, int head_dim) {
  if (bytes <= device.smem_per_block) return nullptr;
  return fail(std::string("the ") + kernel + " kernel for head_dim " + std::to_string(head_dim) + " needs " +
              std::to_string(bytes) + " bytes of shared memory per block; this device allows " +
              std::to_string(device.smem_per_block));
}

bool sm80_forward_pinned() {
  const char* kernel = std::getenv("FASTATTN_ATTENTION_CUDA_KERNEL");
  return kernel != nullptr && std::strcmp(kernel, "sm80") == 0;
}

template <int kHeadDim, typename Element>
const char* forward_for(const FwdParams& p, cudaStream_t stream, const Device& device) {
  if (device.arch == 90 && !sm80_forward_pinned()) {
    using Sm90 = FwdTraitsSm90<kHeadDim, Element>;
    if (const char* err = check_shared_memory(device, Sm90::kSmemBytes, "Hopper forward", kHeadDim)) return err;
    const cudaError_t err = p.is_causal ? run_fwd_sm90<kHeadDim, Element, true>(p, stream)
                                        : run_fwd_sm90<kHeadDim, Element, false>(p, stream);
    if (err != cudaErrorNotSupported) return from_cuda(err, "attention forward (sm90 kernel)");
  }
  using Traits = FwdTraitsSm80<kHeadDim, Element>;
  if (const char* err = check_shared_memory(device, Traits::kSmemBytes, "forward", kHeadDim)) return err;
  return from_cuda(p.is_causal ? run_fwd_sm80<kHeadDim, Element, true>(p, stream)
                               : run_fwd_sm80<kHeadDim, Element, false>(p, stream),
                   "attention forward (sm80 kernel)");
}

template <int kHeadDim, typename Element>
const char* backward_for(const BwdParams& p, cudaStream_t stream, const Device& device) {
  const int bytes = std::max(BwdDqTraitsSm80<kHeadDim, Element>::kSmemBytes,
                             BwdDkdvTraitsSm80<kHeadDim, Element>::kSmemBytes);
  if (const char* err = check_shared_memory(device, bytes, "backward", kHeadDim)) return err;
  return from_cuda(p.is_causal ? run_bwd_sm80<kHeadDim, Element, true>(p, stream)
                               : run_bwd_sm80<kHeadDim, Element, false>(p, stream),
                   "attention backward (sm80 kernels)");
}

template <typename Params, typename Run>
const char* dispatch(const Params& p, Run run) {
  Device device;
  if (const char* err = from_cuda(current_device(device), "reading the device's properties")) return err;
  if (device.arch < 80) {
    return fail("the cuda attention kernels need compute capability 8.0 or newer, this device has " +
                std::to_string(device.arch / 10) + "." + std::to_string(device.arch % 10));
  }
  const bool bf16 = p.dtype == DType::kBFloat16;
  switch (p.head_dim) {
#define FASTATTN_ATTENTION_CASE(D) \
  case D:                          \
    return bf16 ? run.template operator()<D, __nv_bfloat16>(p, device) : run.template operator()<D, __half>(p, device);
    FASTATTN_ATTENTION_FOR_EACH_HEAD_DIM(FASTATTN_ATTENTION_CASE)
#undef FASTATTN_ATTENTION_CASE
    default:
      return fail("no cuda attention kernel for head_dim " + std::to_string(p.head_dim));
  }
}

}  // namespace

const char* forward(const FwdParams& params, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch(params, [s]<int kHeadDim, typename Element>(const FwdParams& p, const Device& device) {
    return forward_for<kHeadDim, Element>(p, s, device);
  });
}

const char* backward(const BwdParams& params, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch(params, [s]<int kHeadDim, typename Element>(const BwdParams& p, const Device& device) {
    return backward_for<kHeadDim, Element>(p, s, device);
  });
}

int compiled_head_dims(int* head_dims, int capacity) {
  int count = 0;
#define FASTATTN_ATTENTION_LIST(D)            \
  if (count < capacity) head_dims[count] = D; \
  ++count;
  FASTATTN_ATTENTION_FOR_EACH_HEAD_DIM(FASTATTN_ATTENTION_LIST)
#undef FASTATTN_ATTENTION_LIST
  return count;
}

}  // namespace attention
}  // namespace fastattn
