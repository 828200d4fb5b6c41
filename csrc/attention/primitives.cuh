// The sm80 instructions the attention kernels are written with: ldmatrix, mma.sync
// m16n8k16, cp.async with commit/wait groups, shfl.xor, bar.sync, ex2.approx; plus the
// swizzled shared-memory layout of a (rows, head_dim) tile and element packing.
//
// Each wrapper is inline PTX on the device. Under FASTATTN_EMULATE (a host build of
// tests/cuda_emulation/) the same wrappers call emulation.cuh instead, and kernel
// bodies marked FA_DEVICE become host functions.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(FASTATTN_EMULATE) && !defined(__CUDA_ARCH__)
#include "attention/emulation.cuh"
#define FA_DEVICE inline
#define FA_EMULATED 1
#else
#define FA_DEVICE __device__ __forceinline__
#define FA_EMULATED 0
#endif

namespace fastattn {
namespace attention {

// ---------------------------------------------------------------- elements

template <typename Element>
struct ElementTraits;

template <>
struct ElementTraits<__half> {
  static constexpr bool kIsBF16 = false;
  static FA_DEVICE uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    uint32_t bits;
    static_assert(sizeof(h) == 4, "half2 is 4 bytes");
    __builtin_memcpy(&bits, &h, 4);
    return bits;
  }
  static FA_DEVICE float2 unpack(uint32_t bits) {
    __half2_raw raw;
    raw.x = static_cast<unsigned short>(bits & 0xFFFFu);
    raw.y = static_cast<unsigned short>(bits >> 16);
    return __half22float2(__half2(raw));
  }
};

template <>
struct ElementTraits<__nv_bfloat16> {
  static constexpr bool kIsBF16 = true;
  static FA_DEVICE uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t bits;
    static_assert(sizeof(h) == 4, "bfloat162 is 4 bytes");
    __builtin_memcpy(&bits, &h, 4);
    return bits;
  }
  static FA_DEVICE float2 unpack(uint32_t bits) {
    __nv_bfloat162_raw raw;
    raw.x = static_cast<unsigned short>(bits & 0xFFFFu);
    raw.y = static_cast<unsigned short>(bits >> 16);
    return __bfloat1622float2(__nv_bfloat162(raw));
  }
};

// 16 bytes: the unit of every global and shared memory vector access.
struct alignas(16) Chunk {
  uint32_t x, y, z, w;
};

// ---------------------------------------------------------------- shared-memory layout
//
// A (rows, kCols) tile of 2-byte elements, kCols a multiple of 64, stored row-major in
// 16-byte chunks of 8 elements with chunk c of row r at position c ^ (r % 8): the 8
// rows an ldmatrix phase reads (same logical chunk, 8 consecutive rows) land in 8
// different 16-byte bank groups, and a row's chunks stay contiguous for cp.async.
template <int kCols>
FA_DEVICE int swizzle(int row, int chunk) {
  static_assert(kCols % 64 == 0, "swizzle needs at least 8 chunks per row");
  return row * kCols + ((chunk ^ (row & 7)) << 3);
}

// ---------------------------------------------------------------- instructions

FA_DEVICE uint32_t smem_address(const void* ptr) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
#elif FA_EMULATED
  return emu::shared_offset(ptr);
#else
  (void)ptr;
  return 0;
#endif
}

FA_DEVICE void block_sync() {
#if defined(__CUDA_ARCH__)
  __syncthreads();
#elif FA_EMULATED
  emu::block_barrier();
#endif
}

FA_DEVICE float shfl_xor(float value, int mask) {
#if defined(__CUDA_ARCH__)
  return __shfl_xor_sync(0xffffffffu, value, mask);
#elif FA_EMULATED
  return emu::shfl_xor(value, mask);
#else
  (void)mask;
  return value;
#endif
}

// 2^x; ex2.approx.ftz gives +0 for -inf.
FA_DEVICE float exp2_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#else
  return __builtin_exp2f(x);
#endif
}

// Four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8.
FA_DEVICE void ldmatrix_x4(uint32_t (&regs)[4], const void* row_address) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(regs[0]), "=r"(regs[1]), "=r"(regs[2]), "=r"(regs[3])
               : "r"(smem_address(row_address)));
#elif FA_EMULATED
  emu::ldmatrix_x4(regs, row_address, false);
#else
  (void)regs;
  (void)row_address;
#endif
}

FA_DEVICE void ldmatrix_x4_trans(uint32_t (&regs)[4], const void* row_address) {
#if defined(__CUDA_ARCH__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(regs[0]), "=r"(regs[1]), "=r"(regs[2]), "=r"(regs[3])
               : "r"(smem_address(row_address)));
#elif FA_EMULATED
  emu::ldmatrix_x4(regs, row_address, true);
#else
  (void)regs;
  (void)row_address;
#endif
}

// acc (16x8 fp32) += a (16x16, row) · b (16x8, col).
template <typename Element>
FA_DEVICE void mma_16816(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__)
  if constexpr (ElementTraits<Element>::kIsBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#elif FA_EMULATED
  const uint32_t b[2] = {b0, b1};
  const float c[4] = {acc[0], acc[1], acc[2], acc[3]};
  emu::mma_m16n8k16(acc, a, b, c, ElementTraits<Element>::kIsBF16);
#else
  (void)acc;
  (void)a;
  (void)b0;
  (void)b1;
#endif
}

// 16 bytes global -> shared, asynchronously; zero-filled (and src not read) when !valid.
FA_DEVICE void cp_async_16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
#elif FA_EMULATED
  emu::cp_async(smem, gmem, 16, valid);
#else
  (void)smem;
  (void)gmem;
  (void)valid;
#endif
}

// 4 bytes global -> shared, asynchronously; zero-filled when !valid.
FA_DEVICE void cp_async_4(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(valid ? 4 : 0));
#elif FA_EMULATED
  emu::cp_async(smem, gmem, 4, valid);
#else
  (void)smem;
  (void)gmem;
  (void)valid;
#endif
}

FA_DEVICE void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::);
#elif FA_EMULATED
  emu::cp_async_commit();
#endif
}

// Waits until at most kPending of this thread's committed groups are in flight.
template <int kPending>
FA_DEVICE void cp_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#elif FA_EMULATED
  emu::cp_async_wait(kPending);
#endif
}

}  // namespace attention
}  // namespace fastattn
