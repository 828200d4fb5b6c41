// Host entry points of the attention kernels: pick the instantiation for the current
// device's arch and the call's (head_dim, dtype, causal), check the shared-memory
// budget, launch.
//
// The forward runs the Hopper kernel on sm90 and the sm80 kernel elsewhere: on other
// archs, on sm90 when the build has no sm_90a code for it, and where TMA cannot describe
// the tensors (dispatch.h); FASTATTN_ATTENTION_CUDA_KERNEL=sm80 pins the sm80 forward on
// sm90 too (tests and benchmarks compare the two). Each forward records what it ran.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "attention/api.h"
#include "attention/dispatch.h"
#include "attention/instantiations/head_dims.h"
#include "attention/launch.h"
#include "attention/primitives_sm90.cuh"
#include "attention/traits.cuh"

namespace fastattn {
namespace attention {

// 1 in the sm_90a device pass, where attention_fwd_kernel_sm90 has its body, 0 in every
// other (sm_80, sm_90 without "a", PTX compiled for a newer device), where that kernel
// traps. Every attention source is built for the same archs, so the copy of this file's
// code that the device loaded tells which code it loaded for the Hopper kernel.
__device__ int sm90a_code_flag = FA_SM90_ENABLED;

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
  int index = 0;
  int arch = 0;             // 10·major + minor
  int smem_per_block = 0;   // opt-in limit of dynamic shared memory per block
};

cudaError_t current_device(Device& device) {
  int major = 0, minor = 0;
  cudaError_t err = cudaGetDevice(&device.index);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device.index);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&device.smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index);
  }
  device.arch = 10 * major + minor;
  return err;
}

// Whether the code device `index` loaded holds the Hopper kernel's body: sm90a_code_flag
// read once per device (0 unknown, 1 no, 2 yes). A failed read counts as no: the sm80
// kernel then runs and reports what is wrong with the build.
constexpr int kMaxDevices = 64;
std::atomic<int> sm90a_code_state[kMaxDevices];

bool sm90a_code_loaded(int index) {
  if (index < 0 || index >= kMaxDevices) return false;
  int state = sm90a_code_state[index].load(std::memory_order_acquire);
  if (state == 0) {
    int flag = 0;
    // The first forward may come while another stream is captured into a CUDA graph:
    // this one synchronous copy is allowed then.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
    const cudaError_t err = cudaMemcpyFromSymbol(&flag, sm90a_code_flag, sizeof(flag));
    cudaThreadExchangeStreamCaptureMode(&mode);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      flag = 0;
    }
    state = flag == 1 ? 2 : 1;
    sm90a_code_state[index].store(state, std::memory_order_release);
  }
  return state == 2;
}

thread_local int last_outcome = -1;
std::atomic<int64_t> outcome_counts[kForwardOutcomes];

void record(FwdOutcome outcome) {
  last_outcome = static_cast<int>(outcome);
  outcome_counts[static_cast<int>(outcome)].fetch_add(1, std::memory_order_relaxed);
}

// kSm90 when TMA can describe q, k and v, else the first that it cannot.
FwdOutcome tma_outcome(const FwdParams& p) {
  if (!tma_view(p.batch, p.heads, p.seqlen_q, p.head_dim, p.q_batch_stride, p.q_head_stride, p.q_row_stride)
           .describable) {
    return FwdOutcome::kSm80TmaQ;
  }
  if (!tma_view(p.batch, p.kv_heads, p.seqlen_k, p.head_dim, p.k_batch_stride, p.k_head_stride, p.k_row_stride)
           .describable) {
    return FwdOutcome::kSm80TmaK;
  }
  if (!tma_view(p.batch, p.kv_heads, p.seqlen_k, p.head_dim, p.v_batch_stride, p.v_head_stride, p.v_row_stride)
           .describable) {
    return FwdOutcome::kSm80TmaV;
  }
  return FwdOutcome::kSm90;
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
  const bool pinned = sm80_forward_pinned();
  const bool sm90a_code = device.arch == 90 && !pinned && sm90a_code_loaded(device.index);
  FwdOutcome outcome = choose_forward(device.arch, pinned, sm90a_code);
  if (outcome == FwdOutcome::kSm90) outcome = tma_outcome(p);
  if (outcome == FwdOutcome::kSm90) {
    using Sm90 = FwdTraitsSm90<kHeadDim, Element>;
    if (const char* err = check_shared_memory(device, Sm90::kSmemBytes, "Hopper forward", kHeadDim)) return err;
    const cudaError_t err = p.is_causal ? run_fwd_sm90<kHeadDim, Element, true>(p, stream)
                                        : run_fwd_sm90<kHeadDim, Element, false>(p, stream);
    if (err != cudaErrorNotSupported) {
      record(FwdOutcome::kSm90);
      return from_cuda(err, "attention forward (sm90 kernel)");
    }
    outcome = FwdOutcome::kSm80TmaRefused;
  }
  record(outcome);
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

int last_forward_outcome() { return last_outcome; }

void forward_outcome_counts(int64_t* counts) {
  for (int i = 0; i < kForwardOutcomes; ++i) counts[i] = outcome_counts[i].load(std::memory_order_relaxed);
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
