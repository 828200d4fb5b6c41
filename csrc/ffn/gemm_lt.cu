// GEMM with a fused epilogue through cuBLASLt: the FFN's matrix products.
//
// We keep matrices row-major; cuBLASLt is column-major. A row-major (r, c) matrix with
// row stride ld is the column-major (c, r) matrix with leading dimension ld, its
// transpose. So the row-major D = op(A)·op(B) (m × n) is computed as the column-major
//
//   Dᵀ (n × m) = op(B)ᵀ · op(A)ᵀ
//
// with cuBLASLt's first operand our B and its second our A, each stored as it is:
//   our B stored (k, n) [no trans_b] = column-major (n, k): op N gives op(B)ᵀ (n × k)
//   our B stored (n, k) [trans_b]    = column-major (k, n): op T gives op(B)ᵀ (n × k)
//   our A stored (m, k) [no trans_a] = column-major (k, m): op N gives op(A)ᵀ (k × m)
//   our A stored (k, m) [trans_a]    = column-major (m, k): op T gives op(A)ᵀ (k × m)
// cuBLASLt's bias is per row of its D, i.e. per column of ours: length n, as wanted, and
// its GELU auxiliary output (the pre-activation) is laid out like D.
//
// Accumulation and scaling are fp32 (CUBLAS_COMPUTE_32F: also for fp32 inputs, so no
// TF32). The algorithm comes from cuBLASLt's heuristic, told each pointer's real
// alignment (its default assumes 256 bytes, which a view with a storage offset breaks),
// and is kept per problem; when the heuristic has none for a problem (an epilogue's
// alignment rules, say) gemm_lt returns false and the caller falls back to ATen.
//
// cublasLt.h comes from the nvidia cuBLAS wheel a CUDA torch depends on, or from a full
// CUDA toolkit (setup.py finds it); CI's compile check (.ci/compile_cuda.sh) passes it
// the wheel's include folder.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "ffn/ffn.cuh"

namespace fastattn {
namespace {

void check_lt(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("fastattn cuBLASLt error in ") + what + ": status " +
                             std::to_string(static_cast<int>(status)));
  }
}

// One cuBLASLt handle per device, created on first use and kept for the process.
cublasLtHandle_t lt_handle() {
  constexpr int kMaxDevices = 64;
  static std::mutex mutex;
  static cublasLtHandle_t handles[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    throw std::runtime_error("fastattn cuBLASLt: no usable current CUDA device");
  }
  std::lock_guard<std::mutex> lock(mutex);
  if (handles[device] == nullptr) check_lt(cublasLtCreate(&handles[device]), "cublasLtCreate");
  return handles[device];
}

cudaDataType_t lt_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return CUDA_R_16F;
    case DType::kBFloat16:
      return CUDA_R_16BF;
    case DType::kFloat32:
      return CUDA_R_32F;
  }
  throw std::invalid_argument("fastattn gemm: unsupported dtype");
}

// Descriptors destroyed on every exit path.
struct MatmulDesc {
  cublasLtMatmulDesc_t desc = nullptr;
  ~MatmulDesc() {
    if (desc != nullptr) cublasLtMatmulDescDestroy(desc);
  }
  template <typename V>
  void set(cublasLtMatmulDescAttributes_t attribute, const V& value, const char* what) {
    check_lt(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)), what);
  }
};

struct Layout {
  cublasLtMatrixLayout_t layout = nullptr;
  ~Layout() {
    if (layout != nullptr) cublasLtMatrixLayoutDestroy(layout);
  }
};

struct Preference {
  cublasLtMatmulPreference_t pref = nullptr;
  ~Preference() {
    if (pref != nullptr) cublasLtMatmulPreferenceDestroy(pref);
  }
};

// Column-major (rows, cols) with leading dimension ld.
void make_layout(Layout& out, cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld, const char* what) {
  check_lt(cublasLtMatrixLayoutCreate(&out.layout, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld),
           what);
}

// The largest power of two (at most 256) that divides the address.
uint32_t alignment_of(const void* pointer) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(pointer);
  if (address == 0) return 256;
  const uintptr_t lowest_bit = address & (~address + 1);
  return static_cast<uint32_t>(lowest_bit < 256 ? lowest_bit : 256);
}

// Everything the heuristic's answer depends on: device, types, shapes, strides,
// transposes, epilogue, accumulation, pointer alignments and workspace.
using ProblemKey = std::tuple<int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool, int, bool,
                              int64_t, bool, uint32_t, uint32_t, uint32_t, uint64_t>;

// The heuristic's algorithm per problem (found false: it had none), for the process.
struct CachedAlgo {
  bool found = false;
  cublasLtMatmulAlgo_t algo;
};

std::mutex algo_cache_mutex;
std::map<ProblemKey, CachedAlgo> algo_cache;

}  // namespace

bool gemm_lt(const GemmParams& p, void* stream_ptr) {
  if (p.m <= 0 || p.n <= 0) return true;
  if (p.k <= 0) return false;  // cuBLASLt wants k > 0; the caller fills D itself
  const cudaDataType_t type = lt_type(p.dtype);

  MatmulDesc op;
  check_lt(cublasLtMatmulDescCreate(&op.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t trans_first = p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;   // cuBLASLt's A = our B
  const cublasOperation_t trans_second = p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt's B = our A
  op.set(CUBLASLT_MATMUL_DESC_TRANSA, trans_first, "TRANSA");
  op.set(CUBLASLT_MATMUL_DESC_TRANSB, trans_second, "TRANSB");

  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  switch (p.epilogue) {
    case GemmEpilogue::kNone:
      break;
    case GemmEpilogue::kBias:
      epilogue = CUBLASLT_EPILOGUE_BIAS;
      break;
    case GemmEpilogue::kGeluTanhAux:
      // cuBLASLt's GELU epilogue is the tanh approximation; its aux leading dimension must
      // be a multiple of 8.
      if (p.aux == nullptr || p.ld_aux % 8 != 0) return false;
      epilogue = p.bias != nullptr ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
      op.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, p.aux, "EPILOGUE_AUX_POINTER");
      op.set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, p.ld_aux, "EPILOGUE_AUX_LD");
      break;
  }
  if (epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
    if (p.beta != 0.f) return false;
    op.set(CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue, "EPILOGUE");
  }
  if (p.bias != nullptr && p.epilogue != GemmEpilogue::kNone) {
    op.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, p.bias, "BIAS_POINTER");
  }

  Layout first;   // our B
  Layout second;  // our A
  Layout out;     // our D (also C)
  if (p.trans_b) {
    make_layout(first, type, p.k, p.n, p.ldb, "layout B");
  } else {
    make_layout(first, type, p.n, p.k, p.ldb, "layout B");
  }
  if (p.trans_a) {
    make_layout(second, type, p.m, p.k, p.lda, "layout A");
  } else {
    make_layout(second, type, p.k, p.m, p.lda, "layout A");
  }
  make_layout(out, type, p.n, p.m, p.ldd, "layout D");

  const uint64_t workspace_bytes = p.workspace != nullptr ? p.workspace_bytes : 0;
  // cuBLASLt's A is our B, its B our A, its C and D our D.
  const uint32_t align_first = alignment_of(p.b);
  const uint32_t align_second = alignment_of(p.a);
  const uint32_t align_out = alignment_of(p.d);
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) throw std::runtime_error("fastattn cuBLASLt: no current CUDA device");
  const ProblemKey key{device, static_cast<int>(p.dtype), p.m, p.n, p.k, p.lda, p.ldb, p.ldd, p.trans_a, p.trans_b,
                       static_cast<int>(epilogue), p.bias != nullptr, p.ld_aux, p.beta != 0.f, align_first,
                       align_second, align_out, workspace_bytes};

  const cublasLtHandle_t handle = lt_handle();
  CachedAlgo chosen;
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(algo_cache_mutex);
    const auto it = algo_cache.find(key);
    if (it != algo_cache.end()) {
      chosen = it->second;
      cached = true;
    }
  }
  if (!cached) {
    Preference pref;
    check_lt(cublasLtMatmulPreferenceCreate(&pref.pref), "cublasLtMatmulPreferenceCreate");
    auto prefer = [&](cublasLtMatmulPreferenceAttributes_t attribute, const auto& value, const char* what) {
      check_lt(cublasLtMatmulPreferenceSetAttribute(pref.pref, attribute, &value, sizeof(value)), what);
    };
    prefer(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, workspace_bytes, "MAX_WORKSPACE_BYTES");
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_first, "MIN_ALIGNMENT_A_BYTES");
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_second, "MIN_ALIGNMENT_B_BYTES");
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_out, "MIN_ALIGNMENT_C_BYTES");
    prefer(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_out, "MIN_ALIGNMENT_D_BYTES");
    cublasLtMatmulHeuristicResult_t heuristic = {};
    int found = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, op.desc, first.layout, second.layout,
                                                                 out.layout, out.layout, pref.pref, 1, &heuristic,
                                                                 &found);
    chosen.found = status == CUBLAS_STATUS_SUCCESS && found > 0;
    if (chosen.found) chosen.algo = heuristic.algo;
    std::lock_guard<std::mutex> lock(algo_cache_mutex);
    algo_cache.emplace(key, chosen);
  }
  if (!chosen.found) return false;

  const float alpha = 1.f;
  const float beta = p.beta;
  const cublasStatus_t run = cublasLtMatmul(handle, op.desc, &alpha, p.b, first.layout, p.a, second.layout, &beta, p.d,
                                            out.layout, p.d, out.layout, &chosen.algo, p.workspace, workspace_bytes,
                                            static_cast<cudaStream_t>(stream_ptr));
  if (run == CUBLAS_STATUS_NOT_SUPPORTED) return false;  // refused before launching anything
  check_lt(run, "cublasLtMatmul");
  return true;
}

}  // namespace fastattn
