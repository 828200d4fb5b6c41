// Layer norm and RMSNorm backward: the cuda backend's gradients of layer_norm_fwd.cu.
//
// Per row, with x̂ = (s - mean) · rstd (mean = 0 for RMSNorm) and g = dy · w (w = 1 when
// absent), all in fp32:
//
//   layer norm:  ds = rstd · (g - x̂ · Σ(g·x̂)/N - Σ g/N)
//   RMSNorm:     ds = rstd · (g - x̂ · Σ(g·x̂)/N)
//   ds  += dresidual_out        (the gradient that reached s directly through prenorm)
//   dw   = Σ_rows dy · x̂,   db = Σ_rows dy
//
// ds is stored in the residual dtype TR (s's dtype). dw and db are reduced in two
// deterministic stages, no atomics: a persistent grid of P blocks, block b owning a
// contiguous range of rows and writing row b of the fp32 partials (P, N); then
// _reduce_partial_rows_kernel sums the P rows of each column in a fixed order.
//
// Layouts as in the forward (sizes in layer_norm_traits.cuh):
// - warp per row (N <= kWarpHiddenMax): s and dy of a row in registers; each warp keeps
//   fp32 dw / db for all its rows in its own row of shared memory (each lane touching only
//   its columns), and the block's warps are summed at the end in warp order.
// - block per row: each thread owns the vectors v = tid + k·threads of every row. Its dw /
//   db accumulate in dynamic shared memory when 8·N bytes fit (else directly in the
//   block's partial row in global memory), and s / dy of the current row are cached in
//   shared memory for the second pass when they fit (else re-read). Only the owning thread
//   ever touches an accumulator or cache entry, so neither needs a barrier.
#include <type_traits>

#include "layer_norm/layer_norm_launch.cuh"

namespace fastattn {
namespace {

// Vectors per thread loaded before any is used on the block path.
template <int kVec>
constexpr int kBwdUnroll = kVec >= 4 ? 16 / kVec : 4;

template <typename T, typename TR, int kVec>
__global__ void __launch_bounds__(NormTraits::kWarpRowsPerBlock * kWarpSize, NormTraits::kWarpBwdMinBlocksPerSm)
    _layer_norm_bwd_warp_kernel(
    const NormBwdParams p,         // pointers, sizes, strides: see layer_norm.cuh
    const int64_t rows_per_block   // rows [blockIdx.x · rows_per_block, + rows_per_block) belong to this block
) {
  constexpr int kVecsPerLane = NormTraits::kWarpHiddenMax / (kWarpSize * kVec);
  constexpr int kRows = NormTraits::kWarpRowsPerBlock;
  // Per-warp fp32 dw / db accumulators (each warp owns its row, each lane its columns).
  __shared__ __align__(16) float acc_dw[kRows][NormTraits::kWarpHiddenMax];
  __shared__ __align__(16) float acc_db[kRows][NormTraits::kWarpHiddenMax];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t n = p.hidden;
  const float inv_n = 1.f / static_cast<float>(n);
  const bool params_fp32 = p.weight_dtype == DType::kFloat32;
  const bool want_dw = p.dweight_partial != nullptr;
  const bool want_db = p.dbias_partial != nullptr;

  for (int64_t col = threadIdx.x; col < kRows * NormTraits::kWarpHiddenMax; col += blockDim.x) {
    (&acc_dw[0][0])[col] = 0.f;
    (&acc_db[0][0])[col] = 0.f;
  }
  __syncthreads();

  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t row_end = row_begin + rows_per_block < p.rows ? row_begin + rows_per_block : p.rows;
  for (int64_t row = row_begin + warp; row < row_end; row += kRows) {
    float x_hat[kVecsPerLane][kVec];  // s, then x̂
    float g[kVecsPerLane][kVec];      // dy, then g = dy · w
#pragma unroll
    for (int i = 0; i < kVecsPerLane; ++i) {
      const int64_t col = static_cast<int64_t>(lane + i * kWarpSize) * kVec;
      if (col < n) {
        VecIO<TR, kVec>::load(static_cast<const TR*>(p.s) + row * p.stride_sm + col, x_hat[i]);
        VecIO<T, kVec>::load(static_cast<const T*>(p.dy) + row * p.stride_dym + col, g[i]);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) x_hat[i][j] = g[i][j] = 0.f;
      }
    }
    const float mean = p.mean != nullptr ? p.mean[row] : 0.f;
    const float rstd = p.rstd[row];
    float c1 = 0.f;  // Σ g·x̂
    float c2 = 0.f;  // Σ g
#pragma unroll
    for (int i = 0; i < kVecsPerLane; ++i) {
      const int64_t col = static_cast<int64_t>(lane + i * kWarpSize) * kVec;
      if (col >= n) continue;
      float w[kVec];
      if (p.weight != nullptr) load_param<T, kVec>(p.weight, params_fp32, col, w);
      float dw[kVec];
      float db[kVec];
      VecIO<float, kVec>::load(&acc_dw[warp][col], dw);
      VecIO<float, kVec>::load(&acc_db[warp][col], db);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        x_hat[i][j] = (x_hat[i][j] - mean) * rstd;
        const float dy = g[i][j];
        dw[j] += dy * x_hat[i][j];
        db[j] += dy;
        g[i][j] = p.weight != nullptr ? dy * w[j] : dy;
        c1 += g[i][j] * x_hat[i][j];
        c2 += g[i][j];
      }
      if (want_dw) VecIO<float, kVec>::store(&acc_dw[warp][col], dw);
      if (want_db) VecIO<float, kVec>::store(&acc_db[warp][col], db);
    }
    c1 = warp_sum(c1) * inv_n;
    c2 = p.is_rms_norm ? 0.f : warp_sum(c2) * inv_n;
    float dres[kVecsPerLane][kVec];
#pragma unroll
    for (int i = 0; i < kVecsPerLane; ++i) {
      const int64_t col = static_cast<int64_t>(lane + i * kWarpSize) * kVec;
      if (col < n && p.dresidual_out != nullptr) {
        VecIO<TR, kVec>::load(static_cast<const TR*>(p.dresidual_out) + row * p.stride_drm + col, dres[i]);
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) dres[i][j] = 0.f;
      }
    }
#pragma unroll
    for (int i = 0; i < kVecsPerLane; ++i) {
      const int64_t col = static_cast<int64_t>(lane + i * kWarpSize) * kVec;
      if (col >= n) continue;
      float ds[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) ds[j] = (g[i][j] - x_hat[i][j] * c1 - c2) * rstd + dres[i][j];
      VecIO<TR, kVec>::store(static_cast<TR*>(p.ds) + row * p.stride_dsm + col, ds);
    }
  }

  // This block's partial rows: the sum of its warps' accumulators, in warp order.
  __syncthreads();
  for (int64_t col = threadIdx.x; col < n; col += blockDim.x) {
    float total_dw = 0.f;
    float total_db = 0.f;
#pragma unroll
    for (int w = 0; w < kRows; ++w) {
      total_dw += acc_dw[w][col];
      total_db += acc_db[w][col];
    }
    const int64_t at = static_cast<int64_t>(blockIdx.x) * n + col;
    if (want_dw) p.dweight_partial[at] = total_dw;
    if (want_db) p.dbias_partial[at] = total_db;
  }
}

// Carves 16-byte-aligned regions out of dynamic shared memory.
struct SmemCursor {
  unsigned char* next;
  template <typename U>
  __device__ __forceinline__ U* take(int64_t elems) {
    U* region = reinterpret_cast<U*>(next);
    next += (static_cast<size_t>(elems) * sizeof(U) + 15) / 16 * 16;
    return region;
  }
};

template <typename T, typename TR, int kVec>
__global__ void __launch_bounds__(NormTraits::kBlockThreadsMax) _layer_norm_bwd_block_kernel(
    const NormBwdParams p,          // pointers, sizes, strides: see layer_norm.cuh
    const int64_t rows_per_block,   // rows [blockIdx.x · rows_per_block, + rows_per_block) belong to this block
    const bool cache_rows,          // s and dy of the row cached in dynamic shared memory for pass 2
    const bool smem_accumulators    // dw / db accumulate in dynamic shared memory, else in the partial rows
) {
  constexpr int kUnroll = kBwdUnroll<kVec>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float scratch[2 * kWarpSize];
  const int64_t n = p.hidden;
  const int64_t vecs = n / kVec;
  const int64_t step = static_cast<int64_t>(blockDim.x) * kUnroll;
  const float inv_n = 1.f / static_cast<float>(n);
  const bool params_fp32 = p.weight_dtype == DType::kFloat32;

  SmemCursor cursor{smem};
  float* acc_dw = nullptr;
  float* acc_db = nullptr;
  if (p.dweight_partial != nullptr) {
    acc_dw = smem_accumulators ? cursor.take<float>(n) : p.dweight_partial + static_cast<int64_t>(blockIdx.x) * n;
  }
  if (p.dbias_partial != nullptr) {
    acc_db = smem_accumulators ? cursor.take<float>(n) : p.dbias_partial + static_cast<int64_t>(blockIdx.x) * n;
  }
  TR* cache_s = cache_rows ? cursor.take<TR>(n) : nullptr;
  T* cache_dy = cache_rows ? cursor.take<T>(n) : nullptr;

  float zeros[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) zeros[j] = 0.f;
  for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
    if (acc_dw != nullptr) VecIO<float, kVec>::store(acc_dw + v * kVec, zeros);
    if (acc_db != nullptr) VecIO<float, kVec>::store(acc_db + v * kVec, zeros);
  }

  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t row_end = row_begin + rows_per_block < p.rows ? row_begin + rows_per_block : p.rows;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const TR* s_row = static_cast<const TR*>(p.s) + row * p.stride_sm;
    const T* dy_row = static_cast<const T*>(p.dy) + row * p.stride_dym;
    const float mean = p.mean != nullptr ? p.mean[row] : 0.f;
    const float rstd = p.rstd[row];

    // Pass 1: Σ g·x̂ and Σ g; dw += dy·x̂ and db += dy for this thread's columns.
    float sums[2] = {0.f, 0.f};
    for (int64_t first = threadIdx.x; first < vecs; first += step) {
      float s[kUnroll][kVec];
      float dy[kUnroll][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = first + static_cast<int64_t>(u) * blockDim.x;
        if (v >= vecs) continue;
        VecIO<TR, kVec>::load(s_row + v * kVec, s[u]);
        VecIO<T, kVec>::load(dy_row + v * kVec, dy[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = first + static_cast<int64_t>(u) * blockDim.x;
        if (v >= vecs) continue;
        const int64_t col = v * kVec;
        if (cache_rows) {
          VecIO<TR, kVec>::store(cache_s + col, s[u]);
          VecIO<T, kVec>::store(cache_dy + col, dy[u]);
        }
        float w[kVec];
        if (p.weight != nullptr) load_param<T, kVec>(p.weight, params_fp32, col, w);
        float dw_add[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float x_hat = (s[u][j] - mean) * rstd;
          const float g = p.weight != nullptr ? dy[u][j] * w[j] : dy[u][j];
          sums[0] += g * x_hat;
          sums[1] += g;
          dw_add[j] = dy[u][j] * x_hat;
        }
        if (acc_dw != nullptr) {
          float acc[kVec];
          VecIO<float, kVec>::load(acc_dw + col, acc);
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[j] += dw_add[j];
          VecIO<float, kVec>::store(acc_dw + col, acc);
        }
        if (acc_db != nullptr) {
          float acc[kVec];
          VecIO<float, kVec>::load(acc_db + col, acc);
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[j] += dy[u][j];
          VecIO<float, kVec>::store(acc_db + col, acc);
        }
      }
    }
    block_sum<2>(sums, scratch);
    const float c1 = sums[0] * inv_n;
    const float c2 = p.is_rms_norm ? 0.f : sums[1] * inv_n;

    // Pass 2: ds.
    for (int64_t first = threadIdx.x; first < vecs; first += step) {
      float s[kUnroll][kVec];
      float dy[kUnroll][kVec];
      float dres[kUnroll][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = first + static_cast<int64_t>(u) * blockDim.x;
        if (v >= vecs) continue;
        const int64_t col = v * kVec;
        if (cache_rows) {
          VecIO<TR, kVec>::load(cache_s + col, s[u]);
          VecIO<T, kVec>::load(cache_dy + col, dy[u]);
        } else {
          VecIO<TR, kVec>::load(s_row + col, s[u]);
          VecIO<T, kVec>::load(dy_row + col, dy[u]);
        }
        if (p.dresidual_out != nullptr) {
          VecIO<TR, kVec>::load(static_cast<const TR*>(p.dresidual_out) + row * p.stride_drm + col, dres[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = first + static_cast<int64_t>(u) * blockDim.x;
        if (v >= vecs) continue;
        const int64_t col = v * kVec;
        float w[kVec];
        if (p.weight != nullptr) load_param<T, kVec>(p.weight, params_fp32, col, w);
        float ds[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float x_hat = (s[u][j] - mean) * rstd;
          const float g = p.weight != nullptr ? dy[u][j] * w[j] : dy[u][j];
          ds[j] = (g - x_hat * c1 - c2) * rstd;
          if (p.dresidual_out != nullptr) ds[j] += dres[u][j];
        }
        VecIO<TR, kVec>::store(static_cast<TR*>(p.ds) + row * p.stride_dsm + col, ds);
      }
    }
  }

  if (smem_accumulators) {
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
      float acc[kVec];
      if (acc_dw != nullptr) {
        VecIO<float, kVec>::load(acc_dw + v * kVec, acc);
        VecIO<float, kVec>::store(p.dweight_partial + static_cast<int64_t>(blockIdx.x) * n + v * kVec, acc);
      }
      if (acc_db != nullptr) {
        VecIO<float, kVec>::load(acc_db + v * kVec, acc);
        VecIO<float, kVec>::store(p.dbias_partial + static_cast<int64_t>(blockIdx.x) * n + v * kVec, acc);
      }
    }
  }
}

template <typename TOut>
__global__ void __launch_bounds__(NormTraits::kReduceCols * NormTraits::kReduceRows) _reduce_partial_rows_kernel(
    const float* partial,          // (partial_rows, cols) fp32, contiguous
    const int64_t partial_rows,    // rows to sum
    const int64_t cols,            // columns
    TOut* out                      // (cols,) column sums
) {
  constexpr int kCols = NormTraits::kReduceCols;
  constexpr int kRows = NormTraits::kReduceRows;
  __shared__ float sums[kRows][kCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  float total = 0.f;
  if (col < cols) {
    for (int64_t r = threadIdx.y; r < partial_rows; r += kRows) total += partial[r * cols + col];
  }
  sums[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    total = 0.f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) total += sums[r][threadIdx.x];
    out[col] = from_float<TOut>(total);
  }
}

// Block-path shared memory: fp32 accumulators first (used every row), then the row cache.
struct BlockSmem {
  bool smem_accumulators;
  bool cache_rows;
  size_t bytes;
};

BlockSmem block_bwd_smem(const NormBwdParams& p, size_t elem_t, size_t elem_tr, const NormLaunchOverrides& overrides,
                         const DeviceLimits& limits) {
  const int64_t accumulators = (p.dweight != nullptr) + (p.dbias != nullptr);
  const size_t acc_bytes = accumulators * round_up_16(p.hidden * sizeof(float));
  const size_t cache_bytes = round_up_16(p.hidden * elem_tr) + round_up_16(p.hidden * elem_t);
  const size_t static_bytes = 2 * kWarpSize * sizeof(float);
  size_t limit = static_cast<size_t>(
      limits.max_smem_per_block < NormTraits::kMaxSmemBytes ? limits.max_smem_per_block : NormTraits::kMaxSmemBytes);
  limit = limit > static_bytes ? limit - static_bytes : 0;
  BlockSmem smem{};
  smem.smem_accumulators = overrides.smem_acc != 0 && acc_bytes > 0 && acc_bytes <= limit;
  const size_t used = smem.smem_accumulators ? acc_bytes : 0;
  smem.cache_rows = overrides.cache != 0 && used + cache_bytes <= limit;
  smem.bytes = used + (smem.cache_rows ? cache_bytes : 0);
  return smem;
}

template <typename T, typename TR, int kVec>
NormBwdPlan plan_bwd(const NormBwdParams& p, bool warp_per_row, const NormLaunchOverrides& overrides) {
  const DeviceLimits limits = current_device_limits();
  NormBwdPlan plan;
  plan.warp_per_row = warp_per_row;
  plan.vectorized = kVec > 1;
  int blocks_per_sm = 0;
  int64_t max_blocks = 0;
  if (warp_per_row) {
    constexpr int kRows = NormTraits::kWarpRowsPerBlock;
    plan.threads = kRows * kWarpSize;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, _layer_norm_bwd_warp_kernel<T, TR, kVec>,
                                                             plan.threads, 0),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor(_layer_norm_bwd_warp_kernel)");
    max_blocks = (p.rows + kRows - 1) / kRows;
  } else {
    const BlockSmem smem = block_bwd_smem(p, sizeof(T), sizeof(TR), overrides, limits);
    plan.cache_rows = smem.cache_rows;
    plan.smem_accumulators = smem.smem_accumulators;
    plan.smem_bytes = smem.bytes;
    plan.threads = norm_block_threads(p.hidden / kVec);
    auto kernel = _layer_norm_bwd_block_kernel<T, TR, kVec>;
    if (plan.smem_bytes > 48 * 1024) {
      check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(plan.smem_bytes)),
                 "cudaFuncSetAttribute(_layer_norm_bwd_block_kernel)");
    }
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, plan.threads, plan.smem_bytes),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor(_layer_norm_bwd_block_kernel)");
    max_blocks = p.rows;
  }
  if (blocks_per_sm < 1) blocks_per_sm = 1;
  if (blocks_per_sm > NormTraits::kBwdMaxBlocksPerSm) blocks_per_sm = NormTraits::kBwdMaxBlocksPerSm;
  plan.blocks = static_cast<int64_t>(limits.sm_count) * blocks_per_sm;
  if (plan.blocks > max_blocks) plan.blocks = max_blocks;
  if (plan.blocks < 1) plan.blocks = 1;
  plan.partial_rows = plan.blocks;
  return plan;
}

template <typename T, typename TR, int kVec>
void launch_bwd(const NormBwdParams& p, const NormBwdPlan& plan, cudaStream_t stream) {
  const int64_t rows_per_block = (p.rows + plan.blocks - 1) / plan.blocks;
  if (plan.warp_per_row) {
    _layer_norm_bwd_warp_kernel<T, TR, kVec>
        <<<static_cast<unsigned>(plan.blocks), plan.threads, 0, stream>>>(p, rows_per_block);
    check_cuda(cudaGetLastError(), "_layer_norm_bwd_warp_kernel launch");
  } else {
    auto kernel = _layer_norm_bwd_block_kernel<T, TR, kVec>;
    if (plan.smem_bytes > 48 * 1024) {
      check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(plan.smem_bytes)),
                 "cudaFuncSetAttribute(_layer_norm_bwd_block_kernel)");
    }
    kernel<<<static_cast<unsigned>(plan.blocks), plan.threads, plan.smem_bytes, stream>>>(
        p, rows_per_block, plan.cache_rows, plan.smem_accumulators);
    check_cuda(cudaGetLastError(), "_layer_norm_bwd_block_kernel launch");
  }
}

// Calls fn.template operator()<T, TR, kVec>() through tags for the params' dtypes and plan.
template <typename Fn>
void dispatch_bwd(const NormBwdParams& p, bool vectorized, Fn&& fn) {
  dispatch_norm_types(p.x_dtype, p.residual_dtype, [&](auto t_tag, auto tr_tag) {
    using T = typename decltype(t_tag)::type;
    constexpr int kVec = static_cast<int>(kVecBytes / sizeof(T));
    if (vectorized) {
      fn(t_tag, tr_tag, std::integral_constant<int, kVec>{});
    } else {
      fn(t_tag, tr_tag, std::integral_constant<int, 1>{});
    }
  });
}

// The plan is made before the partial workspaces exist: it sizes them.
void check_bwd_params(const NormBwdParams& p, bool with_workspaces) {
  if (p.weight_dtype != p.x_dtype && p.weight_dtype != DType::kFloat32) {
    throw std::invalid_argument(std::string("fastattn norm: weight must be in dy's dtype or float32, got ") +
                                dtype_name(p.weight_dtype));
  }
  if (p.dweight != nullptr && p.weight == nullptr) {
    throw std::invalid_argument("fastattn norm backward: dweight asked for without a weight");
  }
  if (!with_workspaces) return;
  if ((p.dweight_partial != nullptr) != (p.dweight != nullptr)) {
    throw std::invalid_argument("fastattn norm backward: dweight_partial is needed exactly when dweight is");
  }
  if ((p.dbias_partial != nullptr) != (p.dbias != nullptr)) {
    throw std::invalid_argument("fastattn norm backward: dbias_partial is needed exactly when dbias is");
  }
}

}  // namespace

NormBwdPlan layer_norm_bwd_plan(const NormBwdParams& p) {
  check_bwd_params(p, false);
  const NormLaunchOverrides overrides = read_norm_overrides();
  const int vec = norm_vec_elems(p.x_dtype);
  const bool vectorized = overrides.vec != 0 && p.hidden % vec == 0 &&
                          rows_aligned(p.dy, p.stride_dym, p.x_dtype) &&
                          rows_aligned(p.dresidual_out, p.stride_drm, p.residual_dtype) &&
                          rows_aligned(p.s, p.stride_sm, p.residual_dtype) &&
                          rows_aligned(p.ds, p.stride_dsm, p.residual_dtype) &&
                          rows_aligned(p.weight, 0, p.weight_dtype);
  const bool warp_per_row = norm_warp_per_row(p.hidden, overrides);
  NormBwdPlan plan;
  dispatch_bwd(p, vectorized, [&](auto t_tag, auto tr_tag, auto vec_tag) {
    using T = typename decltype(t_tag)::type;
    using TR = typename decltype(tr_tag)::type;
    plan = plan_bwd<T, TR, decltype(vec_tag)::value>(p, warp_per_row, overrides);
  });
  return plan;
}

void layer_norm_bwd(const NormBwdParams& p, const NormBwdPlan& plan, void* stream_ptr) {
  if (p.rows <= 0 || p.hidden <= 0) return;
  check_bwd_params(p, true);
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_bwd(p, plan.vectorized, [&](auto t_tag, auto tr_tag, auto vec_tag) {
    using T = typename decltype(t_tag)::type;
    using TR = typename decltype(tr_tag)::type;
    launch_bwd<T, TR, decltype(vec_tag)::value>(p, plan, stream);
  });
  if (p.dweight != nullptr) {
    reduce_partial_rows(p.dweight_partial, plan.partial_rows, p.hidden, p.dweight, p.weight_dtype, stream_ptr);
  }
  if (p.dbias != nullptr) {
    reduce_partial_rows(p.dbias_partial, plan.partial_rows, p.hidden, p.dbias, p.weight_dtype, stream_ptr);
  }
}

void reduce_partial_rows(const float* partial, int64_t partial_rows, int64_t cols, void* out, DType out_dtype,
                         void* stream_ptr) {
  if (cols <= 0) return;
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const dim3 block(NormTraits::kReduceCols, NormTraits::kReduceRows);
  const dim3 grid(static_cast<unsigned>((cols + NormTraits::kReduceCols - 1) / NormTraits::kReduceCols));
  switch (out_dtype) {
    case DType::kFloat16:
      _reduce_partial_rows_kernel<__half>
          <<<grid, block, 0, stream>>>(partial, partial_rows, cols, static_cast<__half*>(out));
      break;
    case DType::kBFloat16:
      _reduce_partial_rows_kernel<__nv_bfloat16>
          <<<grid, block, 0, stream>>>(partial, partial_rows, cols, static_cast<__nv_bfloat16*>(out));
      break;
    case DType::kFloat32:
      _reduce_partial_rows_kernel<float>
          <<<grid, block, 0, stream>>>(partial, partial_rows, cols, static_cast<float*>(out));
      break;
  }
  check_cuda(cudaGetLastError(), "_reduce_partial_rows_kernel launch");
}

}  // namespace fastattn
