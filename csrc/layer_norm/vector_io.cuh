// Device helpers shared by the norm and FFN kernels: float conversion of the element
// types, kVec consecutive elements moved with 16-byte accesses, and the row sums of
// a warp and of a block (fixed reduction trees, so results are bitwise reproducible).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "layer_norm/dtype.h"

namespace fastattn {

constexpr int kWarpSize = 32;
constexpr int kVecBytes = 16;  // bytes per vectorized access: one LDG.128 / STG.128

template <typename T>
__device__ __forceinline__ float to_float(T value);
template <>
__device__ __forceinline__ float to_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ float to_float<__half>(__half value) { return __half2float(value); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 value) { return __bfloat162float(value); }

template <typename T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) { return value; }
template <>
__device__ __forceinline__ __half from_float<__half>(float value) { return __float2half_rn(value); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) { return __float2bfloat16_rn(value); }

// value rounded to T and back: what storing it as a T and reading it again gives.
template <typename T>
__device__ __forceinline__ float round_to(float value) { return to_float<T>(from_float<T>(value)); }

// kVec consecutive elements of type T, converted to/from fp32. Accesses are 16 bytes
// wide when kVec * sizeof(T) >= 16 (several of them for fp32 with kVec = 8), else one
// access of kVec elements; the address must be aligned to the access width.
template <typename T, int kVec>
struct VecIO {
  static constexpr int kChunk = (kVec * int(sizeof(T)) >= kVecBytes) ? kVecBytes / int(sizeof(T)) : kVec;
  static_assert(kVec % kChunk == 0, "kVec must be a multiple of the access width");
  struct alignas(kChunk * sizeof(T)) Chunk {
    T v[kChunk];
  };

  __device__ __forceinline__ static void load(const T* ptr, float (&out)[kVec]) {
#pragma unroll
    for (int c = 0; c < kVec / kChunk; ++c) {
      const Chunk chunk = reinterpret_cast<const Chunk*>(ptr)[c];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) out[c * kChunk + i] = to_float<T>(chunk.v[i]);
    }
  }

  __device__ __forceinline__ static void store(T* ptr, const float (&in)[kVec]) {
#pragma unroll
    for (int c = 0; c < kVec / kChunk; ++c) {
      Chunk chunk;
#pragma unroll
      for (int i = 0; i < kChunk; ++i) chunk.v[i] = from_float<T>(in[c * kChunk + i]);
      reinterpret_cast<Chunk*>(ptr)[c] = chunk;
    }
  }
};

// A parameter vector (weight or bias) whose dtype is either T or fp32, chosen at run time.
template <typename T, int kVec>
__device__ __forceinline__ void load_param(const void* ptr, bool is_fp32, int64_t col, float (&out)[kVec]) {
  if (is_fp32) {
    VecIO<float, kVec>::load(static_cast<const float*>(ptr) + col, out);
  } else {
    VecIO<T, kVec>::load(static_cast<const T*>(ptr) + col, out);
  }
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Sum of `value` over the block, returned to every thread. `scratch` holds 32 floats per
// value; the trailing barrier lets the caller reuse it right away.
template <int kValues>
__device__ __forceinline__ void block_sum(float (&values)[kValues], float* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
#pragma unroll
  for (int i = 0; i < kValues; ++i) {
    values[i] = warp_sum(values[i]);
    if (lane == 0) scratch[i * kWarpSize + warp] = values[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kValues; ++i) {
    float total = lane < warps ? scratch[i * kWarpSize + lane] : 0.f;
    values[i] = warp_sum(total);
  }
  __syncthreads();
}

inline bool is_aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("fastattn CUDA error in ") + what + ": " + cudaGetErrorString(status));
  }
}

// Multiprocessor count and opt-in shared memory per block of the current device.
struct DeviceLimits {
  int sm_count;
  int max_smem_per_block;
};

inline DeviceLimits current_device_limits() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  DeviceLimits limits{};
  check_cuda(cudaDeviceGetAttribute(&limits.sm_count, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute(MultiProcessorCount)");
  check_cuda(cudaDeviceGetAttribute(&limits.max_smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return limits;
}

}  // namespace fastattn
