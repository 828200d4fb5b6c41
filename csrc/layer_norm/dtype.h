// Element types of the CUDA kernels, shared by csrc/layer_norm and csrc/ffn.
//
// Plain C++ with no CUDA or torch headers: csrc/ops.cpp includes it (through the params
// headers) and maps at::ScalarType onto it; the kernels map it onto __half,
// __nv_bfloat16 and float.
#pragma once

#include <cstdint>

namespace fastattn {

enum class DType : int32_t { kFloat16, kBFloat16, kFloat32 };

inline int dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat32:
      return "float32";
  }
  return "unknown";
}

}  // namespace fastattn
