// Layer norm and RMSNorm forward with a fused residual add: the cuda backend of
// fastattn.layer_norm and fastattn.rms_norm.
//
// Per row of N = hidden elements, statistics and arithmetic in fp32:
//
//   s    = x + r                rounded to the residual dtype TR, stored as residual_out
//                               (s = x, nothing stored, without a residual)
//   layer norm:  mean = Σ s / N,  rstd = 1 / sqrt(Σ (s - mean)² / N + eps)   (two passes over s)
//   RMSNorm:     mean = 0,        rstd = 1 / sqrt(Σ s² / N + eps)
//   y    = (s - mean) · rstd · w + b      (w = 1, b = 0 when absent), stored in x's dtype T
//
// Two layouts, one source of truth for their sizes in layer_norm_traits.cuh:
// - warp per row (N <= kWarpHiddenMax): each lane holds up to kWarpHiddenMax / 32 elements
//   of s in registers; the row sums are warp shuffles. kWarpRowsPerBlock rows per block.
// - block per row (N > kWarpHiddenMax): each thread walks its vectors v = tid + k·threads;
//   s is kept in dynamic shared memory (each thread re-reads only what it wrote, so no
//   barrier guards the cache) or, when the row does not fit, recomputed from x and r.
// Accesses are 16 bytes wide (kVec = 16 / sizeof(T) elements) when every row is 16-byte
// aligned and N % kVec == 0, else one element wide (kVec = 1).
#include "layer_norm/layer_norm_launch.cuh"

namespace fastattn {
namespace {

// Vectors per thread loaded before any is used on the block path (loads in flight):
// two 16-byte vectors of a 16-bit type, four of float32, four single elements.
template <int kVec>
constexpr int kFwdUnroll = kVec >= 4 ? 16 / kVec : 4;

// x (and r) of kVec columns starting at `col`, as fp32.
template <typename T, typename TR, int kVec>
__device__ __forceinline__ void load_inputs(const NormFwdParams& p, int64_t row, int64_t col, float (&x)[kVec],
                                            float (&r)[kVec]) {
  VecIO<T, kVec>::load(static_cast<const T*>(p.x) + row * p.stride_xm + col, x);
  if (p.residual != nullptr) VecIO<TR, kVec>::load(static_cast<const TR*>(p.residual) + row * p.stride_rm + col, r);
}

// s = x + r rounded to TR, in place in x; stored to residual_out when `store`.
template <typename TR, int kVec>
__device__ __forceinline__ void add_residual(const NormFwdParams& p, int64_t row, int64_t col, float (&x)[kVec],
                                             const float (&r)[kVec], bool store) {
  if (p.residual == nullptr) return;
#pragma unroll
  for (int i = 0; i < kVec; ++i) x[i] = round_to<TR>(x[i] + r[i]);
  if (store) VecIO<TR, kVec>::store(static_cast<TR*>(p.residual_out) + row * p.stride_om + col, x);
}

// y = (s - mean) · rstd · w + b for kVec columns, stored in T.
template <typename T, int kVec>
__device__ __forceinline__ void store_y(const NormFwdParams& p, int64_t row, int64_t col, const float (&s)[kVec],
                                        float mean, float rstd) {
  const bool params_fp32 = p.weight_dtype == DType::kFloat32;
  float y[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) y[i] = (s[i] - mean) * rstd;
  if (p.weight != nullptr) {
    float w[kVec];
    load_param<T, kVec>(p.weight, params_fp32, col, w);
#pragma unroll
    for (int i = 0; i < kVec; ++i) y[i] *= w[i];
  }
  if (p.bias != nullptr) {
    float b[kVec];
    load_param<T, kVec>(p.bias, params_fp32, col, b);
#pragma unroll
    for (int i = 0; i < kVec; ++i) y[i] += b[i];
  }
  VecIO<T, kVec>::store(static_cast<T*>(p.y) + row * p.stride_ym + col, y);
}

template <typename T, typename TR, int kVec>
__global__ void __launch_bounds__(NormTraits::kWarpRowsPerBlock * kWarpSize) _layer_norm_fwd_warp_kernel(
    const NormFwdParams p  // pointers, sizes, strides: see layer_norm.cuh
) {
  constexpr int kVecsPerLane = NormTraits::kWarpHiddenMax / (kWarpSize * kVec);
  constexpr int kRows = NormTraits::kWarpRowsPerBlock;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t n = p.hidden;
  const float inv_n = 1.f / static_cast<float>(n);

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / kWarpSize; row < p.rows;
       row += static_cast<int64_t>(gridDim.x) * kRows) {
    float s[kVecsPerLane][kVec];
    float r[kVecsPerLane][kVec];
    // Every load of the row is issued before the first use.
#pragma unroll
    for (int i = 0; i < kVecsPerLane; ++i) {
      const int64_t col = static_cast<int64_t>(lane + i * kWarpSize) * kVec;
      if (col < n) {
        load_inputs<T, TR, kVec>(p, row, col, s[i], r[i]);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) s[i][j] = 0.f;
      }
    }
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kVecsPerLane; ++i) {
      const int64_t col = static_cast<int64_t>(lane + i * kWarpSize) * kVec;
      if (col < n) {
        add_residual<TR, kVec>(p, row, col, s[i], r[i], true);
#pragma unroll
        for (int j = 0; j < kVec; ++j) sum += p.is_rms_norm ? s[i][j] * s[i][j] : s[i][j];
      }
    }
    sum = warp_sum(sum);
    float mean = 0.f;
    float rstd;
    if (p.is_rms_norm) {
      rstd = rsqrtf(sum * inv_n + p.eps);
    } else {
      mean = sum * inv_n;
      float squares = 0.f;
#pragma unroll
      for (int i = 0; i < kVecsPerLane; ++i) {
        const int64_t col = static_cast<int64_t>(lane + i * kWarpSize) * kVec;
        if (col < n) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            const float centered = s[i][j] - mean;
            squares += centered * centered;
          }
        }
      }
      rstd = rsqrtf(warp_sum(squares) * inv_n + p.eps);
    }
#pragma unroll
    for (int i = 0; i < kVecsPerLane; ++i) {
      const int64_t col = static_cast<int64_t>(lane + i * kWarpSize) * kVec;
      if (col < n) store_y<T, kVec>(p, row, col, s[i], mean, rstd);
    }
    if (lane == 0) {
      if (p.mean != nullptr) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
  }
}

// kFwdUnroll<kVec> vectors of s for this thread, starting at vector `first` with stride
// blockDim.x: from the shared-memory cache, or recomputed from x and r (nothing stored).
template <typename T, typename TR, int kVec>
__device__ __forceinline__ void reload_s(const NormFwdParams& p, const TR* cache, int64_t row, int64_t first,
                                         int64_t vecs, float (&s)[kFwdUnroll<kVec>][kVec]) {
  float r[kFwdUnroll<kVec>][kVec];
#pragma unroll
  for (int u = 0; u < kFwdUnroll<kVec>; ++u) {
    const int64_t v = first + static_cast<int64_t>(u) * blockDim.x;
    if (v >= vecs) continue;
    if (cache != nullptr) {
      VecIO<TR, kVec>::load(cache + v * kVec, s[u]);
    } else {
      load_inputs<T, TR, kVec>(p, row, v * kVec, s[u], r[u]);
    }
  }
  if (cache != nullptr) return;
#pragma unroll
  for (int u = 0; u < kFwdUnroll<kVec>; ++u) {
    const int64_t v = first + static_cast<int64_t>(u) * blockDim.x;
    if (v < vecs) add_residual<TR, kVec>(p, row, v * kVec, s[u], r[u], false);
  }
}

template <typename T, typename TR, int kVec>
__global__ void __launch_bounds__(NormTraits::kBlockThreadsMax) _layer_norm_fwd_block_kernel(
    const NormFwdParams p,  // pointers, sizes, strides: see layer_norm.cuh
    const bool cache_row    // keep s in dynamic shared memory (hidden elements of TR)
) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float scratch[kWarpSize];
  TR* cache = cache_row ? reinterpret_cast<TR*>(smem) : nullptr;
  const int64_t n = p.hidden;
  const int64_t vecs = n / kVec;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kFwdUnroll<kVec>;
  const float inv_n = 1.f / static_cast<float>(n);

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    // Pass 1: s = x + r (stored as residual_out and cached), and Σ s (Σ s² for RMSNorm).
    float sum[1] = {0.f};
    for (int64_t first = threadIdx.x; first < vecs; first += step) {
      float s[kFwdUnroll<kVec>][kVec];
      float r[kFwdUnroll<kVec>][kVec];
#pragma unroll
      for (int u = 0; u < kFwdUnroll<kVec>; ++u) {
        const int64_t v = first + static_cast<int64_t>(u) * blockDim.x;
        if (v < vecs) load_inputs<T, TR, kVec>(p, row, v * kVec, s[u], r[u]);
      }
#pragma unroll
      for (int u = 0; u < kFwdUnroll<kVec>; ++u) {
        const int64_t v = first + static_cast<int64_t>(u) * blockDim.x;
        if (v >= vecs) continue;
        add_residual<TR, kVec>(p, row, v * kVec, s[u], r[u], true);
        if (cache != nullptr) VecIO<TR, kVec>::store(cache + v * kVec, s[u]);
#pragma unroll
        for (int j = 0; j < kVec; ++j) sum[0] += p.is_rms_norm ? s[u][j] * s[u][j] : s[u][j];
      }
    }
    block_sum<1>(sum, scratch);
    float mean = 0.f;
    float rstd;
    if (p.is_rms_norm) {
      rstd = rsqrtf(sum[0] * inv_n + p.eps);
    } else {
      // Pass 2: Σ (s - mean)².
      mean = sum[0] * inv_n;
      float squares[1] = {0.f};
      for (int64_t first = threadIdx.x; first < vecs; first += step) {
        float s[kFwdUnroll<kVec>][kVec];
        reload_s<T, TR, kVec>(p, cache, row, first, vecs, s);
#pragma unroll
        for (int u = 0; u < kFwdUnroll<kVec>; ++u) {
          if (first + static_cast<int64_t>(u) * blockDim.x >= vecs) continue;
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            const float centered = s[u][j] - mean;
            squares[0] += centered * centered;
          }
        }
      }
      block_sum<1>(squares, scratch);
      rstd = rsqrtf(squares[0] * inv_n + p.eps);
    }
    // Pass 3: y.
    for (int64_t first = threadIdx.x; first < vecs; first += step) {
      float s[kFwdUnroll<kVec>][kVec];
      reload_s<T, TR, kVec>(p, cache, row, first, vecs, s);
#pragma unroll
      for (int u = 0; u < kFwdUnroll<kVec>; ++u) {
        const int64_t v = first + static_cast<int64_t>(u) * blockDim.x;
        if (v < vecs) store_y<T, kVec>(p, row, v * kVec, s[u], mean, rstd);
      }
    }
    if (threadIdx.x == 0) {
      if (p.mean != nullptr) p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
  }
}

template <typename T, typename TR, int kVec>
void launch_fwd(const NormFwdParams& p, bool warp_per_row, bool cache_allowed, cudaStream_t stream) {
  if (warp_per_row) {
    constexpr int kRows = NormTraits::kWarpRowsPerBlock;
    int64_t blocks = (p.rows + kRows - 1) / kRows;
    if (blocks > kMaxGridX) blocks = kMaxGridX;
    _layer_norm_fwd_warp_kernel<T, TR, kVec>
        <<<static_cast<unsigned>(blocks), kRows * kWarpSize, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "_layer_norm_fwd_warp_kernel launch");
    return;
  }
  const int64_t vecs = p.hidden / kVec;
  const int threads = norm_block_threads(vecs);
  const DeviceLimits limits = current_device_limits();
  const size_t cache_bytes = static_cast<size_t>(p.hidden) * sizeof(TR);
  const size_t smem_limit = static_cast<size_t>(
      limits.max_smem_per_block < NormTraits::kMaxSmemBytes ? limits.max_smem_per_block : NormTraits::kMaxSmemBytes);
  const bool cache_row = cache_allowed && cache_bytes + kWarpSize * sizeof(float) <= smem_limit;
  const size_t smem_bytes = cache_row ? cache_bytes : 0;
  auto kernel = _layer_norm_fwd_block_kernel<T, TR, kVec>;
  if (smem_bytes > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)),
               "cudaFuncSetAttribute(_layer_norm_fwd_block_kernel)");
  }
  const int64_t blocks = p.rows < kMaxGridX ? p.rows : kMaxGridX;
  kernel<<<static_cast<unsigned>(blocks), threads, smem_bytes, stream>>>(p, cache_row);
  check_cuda(cudaGetLastError(), "_layer_norm_fwd_block_kernel launch");
}

}  // namespace

void layer_norm_fwd(const NormFwdParams& p, void* stream_ptr) {
  if (p.rows <= 0 || p.hidden <= 0) return;
  if (p.weight_dtype != p.x_dtype && p.weight_dtype != DType::kFloat32) {
    throw std::invalid_argument(std::string("fastattn norm: weight and bias must be in x's dtype or float32, got ") +
                                dtype_name(p.weight_dtype));
  }
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const NormLaunchOverrides overrides = read_norm_overrides();
  const bool warp_per_row = norm_warp_per_row(p.hidden, overrides);
  const bool cache_allowed = overrides.cache != 0;
  const int vec = norm_vec_elems(p.x_dtype);
  const bool vectorized =
      overrides.vec != 0 && p.hidden % vec == 0 && rows_aligned(p.x, p.stride_xm, p.x_dtype) &&
      rows_aligned(p.y, p.stride_ym, p.x_dtype) && rows_aligned(p.residual, p.stride_rm, p.residual_dtype) &&
      rows_aligned(p.residual_out, p.stride_om, p.residual_dtype) && rows_aligned(p.weight, 0, p.weight_dtype) &&
      rows_aligned(p.bias, 0, p.weight_dtype);
  dispatch_norm_types(p.x_dtype, p.residual_dtype, [&](auto t_tag, auto tr_tag) {
    using T = typename decltype(t_tag)::type;
    using TR = typename decltype(tr_tag)::type;
    if (vectorized) {
      launch_fwd<T, TR, static_cast<int>(kVecBytes / sizeof(T))>(p, warp_per_row, cache_allowed, stream);
    } else {
      launch_fwd<T, TR, 1>(p, warp_per_row, cache_allowed, stream);
    }
  });
}

}  // namespace fastattn
