// Launch plumbing shared by layer_norm_fwd.cu and layer_norm_bwd.cu: dtype dispatch, the
// alignment test for the 16-byte path, and FASTATTN_LAYER_NORM_CUDA_CONFIG, which pins
// launch choices so tests reach every path at small sizes:
//
//   FASTATTN_LAYER_NORM_CUDA_CONFIG="path=block,vec=0,cache=0,smem_acc=0"
//
//   path      warp | block   warp per row (only for hidden <= kWarpHiddenMax) or block per row
//   vec       0 | 1          1: 16-byte accesses where the alignment allows; 0: one element per access
//   cache     0 | 1          block path: keep the row in shared memory (when it fits) or re-read it
//   smem_acc  0 | 1          block-path backward: dw / db accumulate in shared memory (when they fit)
//                            or in the fp32 partial rows in global memory
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "layer_norm/layer_norm.cuh"
#include "layer_norm/layer_norm_traits.cuh"
#include "layer_norm/vector_io.cuh"

namespace fastattn {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}, TypeTag<TR>{}) for the element types of x (T) and of the
// residual stream (TR): TR is T or float.
template <typename Fn>
void dispatch_norm_types(DType x_dtype, DType residual_dtype, Fn&& fn) {
  const bool fp32_stream = residual_dtype == DType::kFloat32;
  if (residual_dtype != x_dtype && !fp32_stream) {
    throw std::invalid_argument(std::string("fastattn norm: the residual stream must be in x's dtype or float32, got x ") +
                                dtype_name(x_dtype) + " and residual " + dtype_name(residual_dtype));
  }
  switch (x_dtype) {
    case DType::kFloat16:
      return fp32_stream ? fn(TypeTag<__half>{}, TypeTag<float>{}) : fn(TypeTag<__half>{}, TypeTag<__half>{});
    case DType::kBFloat16:
      return fp32_stream ? fn(TypeTag<__nv_bfloat16>{}, TypeTag<float>{})
                         : fn(TypeTag<__nv_bfloat16>{}, TypeTag<__nv_bfloat16>{});
    case DType::kFloat32:
      return fn(TypeTag<float>{}, TypeTag<float>{});
  }
  throw std::invalid_argument("fastattn norm: unsupported dtype");
}

// Elements per 16-byte vector of x's dtype: 8 for 16-bit types, 4 for float32.
inline int norm_vec_elems(DType x_dtype) { return kVecBytes / dtype_size(x_dtype); }

// A (rows, hidden) operand can be read kVec columns at a time with 16-byte accesses.
inline bool rows_aligned(const void* ptr, int64_t row_stride, DType dtype) {
  return ptr == nullptr || (is_aligned(ptr, kVecBytes) && (row_stride * dtype_size(dtype)) % kVecBytes == 0);
}

struct NormLaunchOverrides {
  int path = -1;  // -1 automatic, 0 warp per row, 1 block per row
  int vec = -1;
  int cache = -1;
  int smem_acc = -1;
};

inline NormLaunchOverrides read_norm_overrides() {
  NormLaunchOverrides overrides;
  const char* env = std::getenv("FASTATTN_LAYER_NORM_CUDA_CONFIG");
  if (env == nullptr || *env == '\0') return overrides;
  std::string spec(env);
  size_t start = 0;
  while (start <= spec.size()) {
    size_t end = spec.find(',', start);
    if (end == std::string::npos) end = spec.size();
    const std::string item = spec.substr(start, end - start);
    start = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    const std::string key = item.substr(0, eq);
    const std::string value = eq == std::string::npos ? "" : item.substr(eq + 1);
    auto flag = [&](int& slot) {
      if (value != "0" && value != "1") {
        throw std::invalid_argument("FASTATTN_LAYER_NORM_CUDA_CONFIG: " + key + " must be 0 or 1, got '" + value + "'");
      }
      slot = value == "1";
    };
    if (key == "path") {
      if (value != "warp" && value != "block") {
        throw std::invalid_argument("FASTATTN_LAYER_NORM_CUDA_CONFIG: path must be warp or block, got '" + value + "'");
      }
      overrides.path = value == "block";
    } else if (key == "vec") {
      flag(overrides.vec);
    } else if (key == "cache") {
      flag(overrides.cache);
    } else if (key == "smem_acc") {
      flag(overrides.smem_acc);
    } else {
      throw std::invalid_argument("FASTATTN_LAYER_NORM_CUDA_CONFIG: unknown key '" + key +
                                  "' (path, vec, cache, smem_acc)");
    }
  }
  return overrides;
}

// Warp per row unless the row is too wide (or the block path is pinned).
inline bool norm_warp_per_row(int64_t hidden, const NormLaunchOverrides& overrides) {
  if (hidden > NormTraits::kWarpHiddenMax) return false;
  return overrides.path != 1;
}

// Threads of a block-per-row block for rows of `vecs` vectors.
inline int norm_block_threads(int64_t vecs) {
  int64_t threads = (vecs + NormTraits::kBlockVecsPerThread - 1) / NormTraits::kBlockVecsPerThread;
  threads = (threads + kWarpSize - 1) / kWarpSize * kWarpSize;
  if (threads < NormTraits::kBlockThreadsMin) threads = NormTraits::kBlockThreadsMin;
  if (threads > NormTraits::kBlockThreadsMax) threads = NormTraits::kBlockThreadsMax;
  return static_cast<int>(threads);
}

inline size_t round_up_16(size_t bytes) { return (bytes + 15) / 16 * 16; }

constexpr int64_t kMaxGridX = 2147483647;

}  // namespace fastattn
