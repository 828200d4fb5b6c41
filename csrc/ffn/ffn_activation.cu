// The FFN's elementwise kernels: bias + activation after the first GEMM, its backward
// with the bias gradient, the gated activation (SwiGLU / GeGLU) and its backward, and the
// column sums of the second bias gradient. Arithmetic in fp32, one rounding at each store.
//
//   forward:        h = round(h + b1)  (kept for the backward),   a = act(h)
//   backward:       dh = round(da · act'(h)),   a = act(h) (recomputed for dW2),   db1 = Σ_rows dh
//   gated forward:  m = act(g) · u
//   gated backward: dg = dm · u · act'(g),   du = dm · act(g),   m = act(g) · u (over dm)
//
//   gelu      act = x·Φ(x),                      act' = Φ(x) + x·φ(x)
//   gelu_tanh act = ½x(1 + t), t = tanh(c(x + 0.044715x³)), c = √(2/π)
//             act' = ½(1 + t) + ½x(1 - t²)·c(1 + 3·0.044715x²)
//   relu      act = max(x, 0),                   act' = [x > 0]
//   silu      act = x·σ(x),                      act' = σ(x)(1 + x(1 - σ(x)))
//
// Column sums are deterministic: each of the ffn_partial_rows(rows) row blocks sums its
// rows per column (threads of a column in a fixed order through shared memory) into its
// own fp32 partial row; reduce_partial_rows (layer_norm_bwd.cu) adds the partial rows.
//
// Layout (ffn_traits.cuh): blocks of kColThreads × kRowThreads threads; a thread owns one
// vector of kVec columns (16 bytes when every row is 16-byte aligned and cols % kVec == 0,
// else kVec = 1) and walks the rows of its block's row range.
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "ffn/ffn.cuh"
#include "ffn/ffn_traits.cuh"
#include "layer_norm/vector_io.cuh"

namespace fastattn {
namespace {

constexpr float kSqrtHalf = 0.70710678118654752f;     // 1/√2
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1/√(2π)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // √(2/π)
constexpr float kGeluTanhCubic = 0.044715f;

// value = act(x) and slope = act'(x).
template <Activation kAct>
__device__ __forceinline__ void activation(float x, float& value, float& slope) {
  if constexpr (kAct == Activation::kGelu) {
    const float cdf = 0.5f * (1.f + erff(x * kSqrtHalf));
    value = x * cdf;
    slope = cdf + x * expf(-0.5f * x * x) * kInvSqrt2Pi;
  } else if constexpr (kAct == Activation::kGeluTanh) {
    const float t = tanhf(kSqrt2OverPi * (x + kGeluTanhCubic * x * x * x));
    value = 0.5f * x * (1.f + t);
    slope = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kGeluTanhCubic * x * x);
  } else if constexpr (kAct == Activation::kRelu) {
    value = x < 0.f ? 0.f : x;  // NaN stays NaN, as in torch.clamp_min
    slope = x > 0.f ? 1.f : 0.f;
  } else if constexpr (kAct == Activation::kSilu) {
    const float sigmoid = 1.f / (1.f + expf(-x));
    value = x * sigmoid;
    slope = sigmoid * (1.f + x * (1.f - sigmoid));
  } else {
    value = x;
    slope = 1.f;
  }
}

// Element (row, col) of a row-major matrix of T with row stride `stride`.
template <typename T>
__device__ __forceinline__ T* at(void* base, int64_t row, int64_t stride, int64_t col) {
  return static_cast<T*>(base) + row * stride + col;
}

template <typename T>
__device__ __forceinline__ const T* at(const void* base, int64_t row, int64_t stride, int64_t col) {
  return static_cast<const T*>(base) + row * stride + col;
}

// Row blocks walk rows blockIdx.y·kRowThreads + threadIdx.y, stepping this much.
__device__ __forceinline__ int64_t row_step() {
  return static_cast<int64_t>(gridDim.y) * FfnTraits::kRowThreads;
}

__device__ __forceinline__ int64_t first_row() {
  return static_cast<int64_t>(blockIdx.y) * FfnTraits::kRowThreads + threadIdx.y;
}

// This thread's fp32 column sums `acc` summed over the block's threadIdx.y in order, into
// row blockIdx.y of `partial` (cols columns).
template <int kVec>
__device__ __forceinline__ void store_column_partial(const float (&acc)[kVec], bool valid, int64_t col, int64_t cols,
                                                     float* partial) {
  constexpr int kWidth = FfnTraits::kColThreads * kVec;
  __shared__ float sums[FfnTraits::kRowThreads][kWidth + 1];
#pragma unroll
  for (int j = 0; j < kVec; ++j) sums[threadIdx.y][threadIdx.x * kVec + j] = acc[j];
  __syncthreads();
  if (threadIdx.y == 0 && valid) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float total = 0.f;
#pragma unroll
      for (int r = 0; r < FfnTraits::kRowThreads; ++r) total += sums[r][threadIdx.x * kVec + j];
      partial[static_cast<int64_t>(blockIdx.y) * cols + col + j] = total;
    }
  }
}

template <typename T, int kVec, Activation kAct>
__global__ void __launch_bounds__(FfnTraits::kColThreads* FfnTraits::kRowThreads) _ffn_act_fwd_kernel(
    const ActFwdParams p  // pointers, sizes, strides: see ffn.cuh
) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * FfnTraits::kColThreads + threadIdx.x;
  if (v >= p.cols / kVec) return;
  const int64_t col = v * kVec;
  float bias[kVec];
  if (p.bias != nullptr) {
    VecIO<T, kVec>::load(static_cast<const T*>(p.bias) + col, bias);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) bias[j] = 0.f;
  }
  for (int64_t row = first_row(); row < p.rows; row += row_step()) {
    float h[kVec];
    VecIO<T, kVec>::load(at<T>(static_cast<const void*>(p.hidden), row, p.stride_hm, col), h);
    if (p.bias != nullptr) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) h[j] = round_to<T>(h[j] + bias[j]);
      if (p.store_hidden) VecIO<T, kVec>::store(at<T>(p.hidden, row, p.stride_hm, col), h);
    }
    float a[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float slope;
      activation<kAct>(h[j], a[j], slope);
    }
    VecIO<T, kVec>::store(at<T>(p.out, row, p.stride_om, col), a);
  }
}

template <typename T, int kVec, Activation kAct>
__global__ void __launch_bounds__(FfnTraits::kColThreads* FfnTraits::kRowThreads) _ffn_act_bwd_kernel(
    const ActBwdParams p  // pointers, sizes, strides: see ffn.cuh
) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * FfnTraits::kColThreads + threadIdx.x;
  const bool valid = v < p.cols / kVec;
  const int64_t col = v * kVec;
  float acc[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) acc[j] = 0.f;
  if (valid) {
    for (int64_t row = first_row(); row < p.rows; row += row_step()) {
      float da[kVec];
      float h[kVec];
      VecIO<T, kVec>::load(at<T>(p.dout, row, p.stride_dom, col), da);
      VecIO<T, kVec>::load(at<T>(p.hidden, row, p.stride_hm, col), h);
      float a[kVec];
      float dh[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        float slope;
        activation<kAct>(h[j], a[j], slope);
        dh[j] = round_to<T>(da[j] * slope);
        acc[j] += dh[j];
      }
      VecIO<T, kVec>::store(at<T>(p.dhidden, row, p.stride_dhm, col), dh);
      if (p.out != nullptr) VecIO<T, kVec>::store(at<T>(p.out, row, p.stride_om, col), a);
    }
  }
  if (p.dbias_partial != nullptr) store_column_partial<kVec>(acc, valid, col, p.cols, p.dbias_partial);
}

template <typename T, int kVec, Activation kAct>
__global__ void __launch_bounds__(FfnTraits::kColThreads* FfnTraits::kRowThreads) _gated_ffn_act_fwd_kernel(
    const GatedFwdParams p  // pointers, sizes, strides: see ffn.cuh
) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * FfnTraits::kColThreads + threadIdx.x;
  if (v >= p.cols / kVec) return;
  const int64_t col = v * kVec;
  for (int64_t row = first_row(); row < p.rows; row += row_step()) {
    float g[kVec];
    float u[kVec];
    VecIO<T, kVec>::load(at<T>(p.gate, row, p.stride_gm, col), g);
    VecIO<T, kVec>::load(at<T>(p.up, row, p.stride_um, col), u);
    float m[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float value;
      float slope;
      activation<kAct>(g[j], value, slope);
      m[j] = value * u[j];
    }
    VecIO<T, kVec>::store(at<T>(p.mixed, row, p.stride_mm, col), m);
  }
}

template <typename T, int kVec, Activation kAct>
__global__ void __launch_bounds__(FfnTraits::kColThreads* FfnTraits::kRowThreads) _gated_ffn_act_bwd_kernel(
    const GatedBwdParams p  // pointers, sizes, strides: see ffn.cuh
) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * FfnTraits::kColThreads + threadIdx.x;
  if (v >= p.cols / kVec) return;
  const int64_t col = v * kVec;
  for (int64_t row = first_row(); row < p.rows; row += row_step()) {
    float g[kVec];
    float u[kVec];
    float dm[kVec];
    VecIO<T, kVec>::load(at<T>(p.gate, row, p.stride_gm, col), g);
    VecIO<T, kVec>::load(at<T>(p.up, row, p.stride_um, col), u);
    VecIO<T, kVec>::load(at<T>(static_cast<const void*>(p.dmixed), row, p.stride_mm, col), dm);
    float dg[kVec];
    float du[kVec];
    float m[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float value;
      float slope;
      activation<kAct>(g[j], value, slope);
      dg[j] = dm[j] * u[j] * slope;
      du[j] = dm[j] * value;
      m[j] = value * u[j];
    }
    VecIO<T, kVec>::store(at<T>(p.dgate, row, p.stride_dgm, col), dg);
    VecIO<T, kVec>::store(at<T>(p.dup, row, p.stride_dum, col), du);
    VecIO<T, kVec>::store(at<T>(p.dmixed, row, p.stride_mm, col), m);
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(FfnTraits::kColThreads* FfnTraits::kRowThreads) _ffn_column_sum_kernel(
    const ColumnSumParams p  // pointers, sizes, strides: see ffn.cuh
) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * FfnTraits::kColThreads + threadIdx.x;
  const bool valid = v < p.cols / kVec;
  const int64_t col = v * kVec;
  float acc[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) acc[j] = 0.f;
  if (valid) {
    for (int64_t row = first_row(); row < p.rows; row += row_step()) {
      float x[kVec];
      VecIO<T, kVec>::load(at<T>(p.x, row, p.stride_xm, col), x);
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] += x[j];
    }
  }
  store_column_partial<kVec>(acc, valid, col, p.cols, p.partial);
}

// ----------------------------------------------------------------------------- launch

template <typename T>
struct Tag {
  using type = T;
};

template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16:
      return fn(Tag<__half>{});
    case DType::kBFloat16:
      return fn(Tag<__nv_bfloat16>{});
    case DType::kFloat32:
      return fn(Tag<float>{});
  }
  throw std::invalid_argument("fastattn ffn: unsupported dtype");
}

template <typename Fn>
void dispatch_activation(Activation activation, Fn&& fn) {
  switch (activation) {
    case Activation::kGelu:
      return fn(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh:
      return fn(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kRelu:
      return fn(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kSilu:
      return fn(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kIdentity:
      return fn(std::integral_constant<Activation, Activation::kIdentity>{});
  }
  throw std::invalid_argument("fastattn ffn: unknown activation");
}

// FASTATTN_FFN_CUDA_CONFIG="vec=0" pins one-element accesses (tests reach the scalar path
// at aligned sizes); other keys of that variable are read by csrc/ops.cpp.
inline bool vectors_allowed() {
  const char* env = std::getenv("FASTATTN_FFN_CUDA_CONFIG");
  return env == nullptr || std::strstr(env, "vec=0") == nullptr;
}

// Every (pointer, row stride) pair allows 16-byte accesses of kVec-column vectors.
inline bool vectorizable(int64_t cols, DType dtype, std::initializer_list<std::pair<const void*, int64_t>> operands) {
  const int vec = kVecBytes / dtype_size(dtype);
  if (cols % vec != 0 || !vectors_allowed()) return false;
  for (const auto& operand : operands) {
    if (operand.first == nullptr) continue;
    if (!is_aligned(operand.first, kVecBytes) || (operand.second * dtype_size(dtype)) % kVecBytes != 0) return false;
  }
  return true;
}

// Grid of an elementwise kernel: columns over x, row blocks over y (row_blocks of them).
inline dim3 elementwise_grid(int64_t cols, int kVec, int64_t row_blocks) {
  const int64_t vecs = cols / kVec;
  return dim3(static_cast<unsigned>((vecs + FfnTraits::kColThreads - 1) / FfnTraits::kColThreads),
              static_cast<unsigned>(row_blocks));
}

inline int64_t plain_row_blocks(int64_t rows) {
  int64_t blocks = (rows + FfnTraits::kRowThreads - 1) / FfnTraits::kRowThreads;
  return blocks > FfnTraits::kMaxRowBlocks ? FfnTraits::kMaxRowBlocks : blocks;
}

const dim3 kBlock(FfnTraits::kColThreads, FfnTraits::kRowThreads);

// Calls fn(Tag<T>, integral_constant<int, kVec>, integral_constant<Activation, kAct>).
template <typename Fn>
void dispatch_all(DType dtype, bool vectorized, Activation activation, Fn&& fn) {
  dispatch_dtype(dtype, [&](auto t_tag) {
    using T = typename decltype(t_tag)::type;
    dispatch_activation(activation, [&](auto act_tag) {
      if (vectorized) {
        fn(t_tag, std::integral_constant<int, static_cast<int>(kVecBytes / sizeof(T))>{}, act_tag);
      } else {
        fn(t_tag, std::integral_constant<int, 1>{}, act_tag);
      }
    });
  });
}

}  // namespace

void ffn_act_fwd(const ActFwdParams& p, void* stream_ptr) {
  if (p.rows <= 0 || p.cols <= 0) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool vectorized =
      vectorizable(p.cols, p.dtype, {{p.hidden, p.stride_hm}, {p.out, p.stride_om}, {p.bias, 0}});
  dispatch_all(p.dtype, vectorized, p.activation, [&](auto t_tag, auto vec_tag, auto act_tag) {
    using T = typename decltype(t_tag)::type;
    constexpr int kVec = decltype(vec_tag)::value;
    _ffn_act_fwd_kernel<T, kVec, decltype(act_tag)::value>
        <<<elementwise_grid(p.cols, kVec, plain_row_blocks(p.rows)), kBlock, 0, stream>>>(p);
  });
  check_cuda(cudaGetLastError(), "_ffn_act_fwd_kernel launch");
}

void ffn_act_bwd(const ActBwdParams& p, void* stream_ptr) {
  if (p.rows <= 0 || p.cols <= 0) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool vectorized = vectorizable(
      p.cols, p.dtype,
      {{p.dout, p.stride_dom}, {p.hidden, p.stride_hm}, {p.dhidden, p.stride_dhm}, {p.out, p.stride_om}});
  const int64_t row_blocks = p.dbias_partial != nullptr ? ffn_partial_rows(p.rows) : plain_row_blocks(p.rows);
  dispatch_all(p.dtype, vectorized, p.activation, [&](auto t_tag, auto vec_tag, auto act_tag) {
    using T = typename decltype(t_tag)::type;
    constexpr int kVec = decltype(vec_tag)::value;
    _ffn_act_bwd_kernel<T, kVec, decltype(act_tag)::value>
        <<<elementwise_grid(p.cols, kVec, row_blocks), kBlock, 0, stream>>>(p);
  });
  check_cuda(cudaGetLastError(), "_ffn_act_bwd_kernel launch");
}

void gated_act_fwd(const GatedFwdParams& p, void* stream_ptr) {
  if (p.rows <= 0 || p.cols <= 0) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool vectorized =
      vectorizable(p.cols, p.dtype, {{p.gate, p.stride_gm}, {p.up, p.stride_um}, {p.mixed, p.stride_mm}});
  dispatch_all(p.dtype, vectorized, p.activation, [&](auto t_tag, auto vec_tag, auto act_tag) {
    using T = typename decltype(t_tag)::type;
    constexpr int kVec = decltype(vec_tag)::value;
    _gated_ffn_act_fwd_kernel<T, kVec, decltype(act_tag)::value>
        <<<elementwise_grid(p.cols, kVec, plain_row_blocks(p.rows)), kBlock, 0, stream>>>(p);
  });
  check_cuda(cudaGetLastError(), "_gated_ffn_act_fwd_kernel launch");
}

void gated_act_bwd(const GatedBwdParams& p, void* stream_ptr) {
  if (p.rows <= 0 || p.cols <= 0) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool vectorized = vectorizable(p.cols, p.dtype,
                                       {{p.gate, p.stride_gm}, {p.up, p.stride_um}, {p.dmixed, p.stride_mm},
                                        {p.dgate, p.stride_dgm}, {p.dup, p.stride_dum}});
  dispatch_all(p.dtype, vectorized, p.activation, [&](auto t_tag, auto vec_tag, auto act_tag) {
    using T = typename decltype(t_tag)::type;
    constexpr int kVec = decltype(vec_tag)::value;
    _gated_ffn_act_bwd_kernel<T, kVec, decltype(act_tag)::value>
        <<<elementwise_grid(p.cols, kVec, plain_row_blocks(p.rows)), kBlock, 0, stream>>>(p);
  });
  check_cuda(cudaGetLastError(), "_gated_ffn_act_bwd_kernel launch");
}

void column_sum(const ColumnSumParams& p, void* stream_ptr) {
  if (p.cols <= 0) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool vectorized = vectorizable(p.cols, p.dtype, {{p.x, p.stride_xm}});
  dispatch_dtype(p.dtype, [&](auto t_tag) {
    using T = typename decltype(t_tag)::type;
    if (vectorized) {
      constexpr int kVec = static_cast<int>(kVecBytes / sizeof(T));
      _ffn_column_sum_kernel<T, kVec><<<elementwise_grid(p.cols, kVec, ffn_partial_rows(p.rows)), kBlock, 0, stream>>>(p);
    } else {
      _ffn_column_sum_kernel<T, 1><<<elementwise_grid(p.cols, 1, ffn_partial_rows(p.rows)), kBlock, 0, stream>>>(p);
    }
  });
  check_cuda(cudaGetLastError(), "_ffn_column_sum_kernel launch");
}

}  // namespace fastattn
