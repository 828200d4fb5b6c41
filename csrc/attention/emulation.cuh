// A host emulator of the few warp-level instructions the attention kernels use, so that
// their index arithmetic, fragment layouts, masking and pipelining can be checked on a
// machine without a GPU (tests/cuda_emulation/): for sm80 ldmatrix, mma.sync m16n8k16,
// cp.async groups, shfl.xor and bar.sync; for sm90 TMA tile loads (128-byte swizzle),
// mbarriers with transaction counts and phases, wgmma m64nNk16 from shared-memory
// descriptors or registers, and named barriers. Only compiled when FASTATTN_EMULATE is
// defined, by a host compiler; the extension never includes it.
//
// A thread block runs as one user-level context (fiber) per CUDA thread on one OS
// thread. A fiber runs until it reaches a warp or block barrier, then yields; warp-wide
// instructions are two warp barriers around an exchange of operands, computed with the
// semantics of the PTX ISA. cp.async copies are either performed at issue (Eager) or
// held until the cp.async.wait_group that retires their group (Deferred): the first
// exposes write-after-read hazards on a ring stage, the second reads of a stage before
// its wait. TMA loads likewise land at issue (Eager) or when a thread first waits on
// their mbarrier (Deferred). wgmma runs synchronously at issue (commit and wait are
// no-ops). Shared memory starts filled with 0xFF bytes (NaN in fp16, bf16 and fp32).
// On x86-64 the fibers switch with a few instructions (callee-saved registers and the
// stack pointer); elsewhere with ucontext, which costs a system call per switch.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastattn {
namespace emu {

enum class CopyMode { kEager, kDeferred };

struct PendingCopy {
  void* dst;
  const void* src;
  int bytes;
  bool zero_fill;
};

#if defined(__x86_64__)
extern "C" void fastattn_emu_switch(void** save_stack, void* load_stack);
// Pushes the callee-saved registers, saves the stack pointer to *save_stack, loads
// load_stack and pops the registers saved there (System V x86-64 calling convention).
asm(R"(
  .text
  .globl fastattn_emu_switch
  .type fastattn_emu_switch, @function
fastattn_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fastattn_emu_switch, .-fastattn_emu_switch
)");
#define FASTATTN_EMU_FAST_SWITCH 1
#else
#define FASTATTN_EMU_FAST_SWITCH 0
#endif

constexpr size_t kFiberStackBytes = size_t(1) << 18;

struct Fiber {
  ucontext_t context;
  void* stack_pointer = nullptr;
  char* stack = nullptr;
  bool done = false;
  std::vector<PendingCopy> uncommitted;
  std::vector<std::vector<PendingCopy>> groups;  // committed, oldest first
};

struct WarpState {
  int arrived = 0;
  uint64_t generation = 0;
  uint32_t exchange[32][4];
  float a[16][16];  // mma operands, gathered from the lanes' fragments
  float b[16][8];
};

struct TmaCopy {
  void* dst;
  std::vector<char> data;  // the box, already swizzled
};

struct MBarrier {
  int expected = 0;   // arrivals per phase
  int pending = 0;    // arrivals still missing in the current phase
  int64_t tx = 0;     // transaction bytes still missing in the current phase
  uint64_t completed = 0;  // phases completed
  std::vector<TmaCopy> in_flight;
};

struct GroupState {
  int arrived = 0;
  uint64_t generation = 0;
};

// The tensor map of an emulated TMA load, stored in the 128 opaque bytes of a CUtensorMap
// by the harness: a 4-D (dims[0] innermost) tensor of 2-byte elements, boxes
// (box[0], box[1], 1, 1), 128-byte swizzle.
struct EmulatedTensorMap {
  const char* base;
  uint64_t dims[4];
  uint64_t strides[3];  // bytes, of dims 1..3
  uint32_t box[2];
};

struct WarpgroupState {
  GroupState barrier;
  uint32_t a[128][4];     // wgmma A fragments from registers
  uint64_t descriptors[128][2];
  int accumulate[128];
};

struct Runtime {
  CopyMode copy_mode = CopyMode::kDeferred;
  bool reverse_order = false;  // schedule fibers (and so warps) last to first
  int current = -1;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  int block_arrived = 0;
  uint64_t block_generation = 0;
  uint64_t progress = 0;
  ucontext_t scheduler;
  void* scheduler_stack_pointer = nullptr;
  std::function<void(int)> body;
  std::vector<std::unique_ptr<char[]>> stacks;  // reused by every block
  char* shared_base = nullptr;  // the block's shared memory (shared address 0)
  std::map<uintptr_t, MBarrier> mbarriers;
  GroupState named[16];
  std::vector<WarpgroupState> warpgroups;
};

inline Runtime& runtime() {
  static Runtime r;
  return r;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulator: %s (thread %d)\n", what, runtime().current);
  std::abort();
}

inline void yield() {
  Runtime& r = runtime();
#if FASTATTN_EMU_FAST_SWITCH
  fastattn_emu_switch(&r.fibers[r.current].stack_pointer, r.scheduler_stack_pointer);
#else
  swapcontext(&r.fibers[r.current].context, &r.scheduler);
#endif
}

inline void warp_barrier() {
  Runtime& r = runtime();
  WarpState& w = r.warps[r.current / 32];
  const uint64_t generation = w.generation;
  ++r.progress;
  if (++w.arrived == 32) {
    w.arrived = 0;
    ++w.generation;
    return;
  }
  while (w.generation == generation) yield();
}

inline void block_barrier() {
  Runtime& r = runtime();
  const uint64_t generation = r.block_generation;
  ++r.progress;
  if (++r.block_arrived == static_cast<int>(r.fibers.size())) {
    r.block_arrived = 0;
    ++r.block_generation;
    return;
  }
  while (r.block_generation == generation) yield();
}

inline void fiber_entry() {
  Runtime& r = runtime();
  const int id = r.current;
  r.body(id);
  r.fibers[id].done = true;
  // A copy never waited for may land after the block's shared memory is reused.
  bool pending = !r.fibers[id].uncommitted.empty();
  for (const auto& group : r.fibers[id].groups) pending = pending || !group.empty();
  if (pending) fail("thread exited with cp.async copies never waited for");
  ++r.progress;
}

#if FASTATTN_EMU_FAST_SWITCH
// A fresh fiber's first switch "returns" here; it never returns (its stack has no caller).
[[noreturn]] inline void fiber_trampoline() {
  fiber_entry();
  Runtime& r = runtime();
  for (;;) fastattn_emu_switch(&r.fibers[r.current].stack_pointer, r.scheduler_stack_pointer);
}
#endif

// Runs `body(thread_index)` for every thread of one block of `nthreads` threads.
inline void run_block(int nthreads, const std::function<void(int)>& body) {
  Runtime& r = runtime();
  if (nthreads % 32 != 0) fail("block size must be a multiple of 32");
  r.body = body;
  r.fibers.assign(nthreads, Fiber{});
  r.warps.assign(nthreads / 32, WarpState{});
  r.warpgroups.assign((nthreads + 127) / 128, WarpgroupState{});
  r.mbarriers.clear();
  for (GroupState& g : r.named) g = GroupState{};
  r.block_arrived = 0;
  while (static_cast<int>(r.stacks.size()) < nthreads) r.stacks.emplace_back(new char[kFiberStackBytes]);
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = r.fibers[t];
    f.stack = r.stacks[t].get();
#if FASTATTN_EMU_FAST_SWITCH
    // Top of the stack: six zeroed callee-saved registers, then the trampoline as the
    // return address, placed so that the trampoline starts with rsp = 8 (mod 16).
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kFiberStackBytes) & ~uintptr_t(15);
    void** slots = reinterpret_cast<void**>(top - 8 * 8);
    for (int i = 0; i < 6; ++i) slots[i] = nullptr;
    slots[6] = reinterpret_cast<void*>(&fiber_trampoline);
    slots[7] = nullptr;
    f.stack_pointer = slots;
#else
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kFiberStackBytes;
    f.context.uc_link = &r.scheduler;
    makecontext(&f.context, fiber_entry, 0);
#endif
  }
  for (;;) {
    bool all_done = true;
    const uint64_t before = r.progress;
    for (int i = 0; i < nthreads; ++i) {
      const int t = r.reverse_order ? nthreads - 1 - i : i;
      if (r.fibers[t].done) continue;
      all_done = false;
      r.current = t;
#if FASTATTN_EMU_FAST_SWITCH
      fastattn_emu_switch(&r.scheduler_stack_pointer, r.fibers[t].stack_pointer);
#else
      swapcontext(&r.scheduler, &r.fibers[t].context);
#endif
    }
    if (all_done) break;
    if (r.progress == before) fail("deadlock: every live thread waits at a barrier the others never reach");
  }
  r.current = -1;
  r.fibers.clear();
}

inline int lane() { return runtime().current % 32; }
inline WarpState& warp() { return runtime().warps[runtime().current / 32]; }

// ---------------------------------------------------------------- instructions

inline float shfl_xor(float value, int mask) {
  WarpState& w = warp();
  std::memcpy(&w.exchange[lane()][0], &value, 4);
  warp_barrier();
  float other;
  std::memcpy(&other, &w.exchange[lane() ^ mask][0], 4);
  warp_barrier();
  return other;
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lanes 8i..8i+7 give the row
// addresses of matrix i; register i of lane l holds, of matrix i, the elements
// (row l/4, columns 2(l%4), 2(l%4)+1), or with .trans (rows 2(l%4), 2(l%4)+1, column l/4).
inline void ldmatrix_x4(uint32_t (&regs)[4], const void* row_address, bool trans) {
  WarpState& w = warp();
  const uintptr_t address = reinterpret_cast<uintptr_t>(row_address);
  if (address % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  std::memcpy(&w.exchange[lane()][0], &address, sizeof(address));
  warp_barrier();
  const int l = lane();
  for (int i = 0; i < 4; ++i) {
    auto row = [&](int r) {
      uintptr_t a;
      std::memcpy(&a, &w.exchange[8 * i + r][0], sizeof(a));
      return reinterpret_cast<const uint16_t*>(a);
    };
    uint16_t lo, hi;
    if (!trans) {
      lo = row(l / 4)[2 * (l % 4)];
      hi = row(l / 4)[2 * (l % 4) + 1];
    } else {
      lo = row(2 * (l % 4))[l / 4];
      hi = row(2 * (l % 4) + 1)[l / 4];
    }
    regs[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  warp_barrier();
}

inline float element_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &wide, 4);
    return f;
  }
  static const std::vector<float> table = [] {
    std::vector<float> t(1 << 16);
    for (uint32_t i = 0; i < t.size(); ++i) {
      __half_raw raw;
      raw.x = static_cast<unsigned short>(i);
      t[i] = __half2float(__half(raw));
    }
    return t;
  }();
  return table[bits];
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, with g = lane/4,
// t = lane%4: A (16x16) reg r holds rows g + 8(r%2), columns 2t + 8(r/2) + {0,1};
// B (16x8) reg r holds rows 2t + 8r + {0,1}, column g; C/D element e is at row
// g + 8(e/2), column 2t + e%2.
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4], bool bf16) {
  WarpState& w = warp();
  const int l = lane(), g = l / 4, t = l % 4;
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r % 2), col = 2 * t + 8 * (r / 2);
    w.a[row][col] = element_to_float(static_cast<uint16_t>(a[r] & 0xFFFF), bf16);
    w.a[row][col + 1] = element_to_float(static_cast<uint16_t>(a[r] >> 16), bf16);
  }
  for (int r = 0; r < 2; ++r) {
    const int k = 2 * t + 8 * r;
    w.b[k][g] = element_to_float(static_cast<uint16_t>(b[r] & 0xFFFF), bf16);
    w.b[k + 1][g] = element_to_float(static_cast<uint16_t>(b[r] >> 16), bf16);
  }
  warp_barrier();
  float result[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float sum = c[e];
    for (int k = 0; k < 16; ++k) sum += w.a[row][k] * w.b[k][col];
    result[e] = sum;
  }
  warp_barrier();
  std::memcpy(d, result, 16);
}

inline void perform(const PendingCopy& c) {
  if (c.zero_fill) {
    std::memset(c.dst, 0, c.bytes);
  } else {
    std::memcpy(c.dst, c.src, c.bytes);
  }
}

inline void cp_async(void* dst, const void* src, int bytes, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || (valid && reinterpret_cast<uintptr_t>(src) % bytes != 0)) {
    fail("cp.async address not aligned to its size");
  }
  PendingCopy c{dst, src, bytes, !valid};
  Runtime& r = runtime();
  if (r.copy_mode == CopyMode::kEager) {
    perform(c);
  } else {
    r.fibers[r.current].uncommitted.push_back(c);
  }
}

inline void cp_async_commit() {
  Fiber& f = runtime().fibers[runtime().current];
  f.groups.push_back(std::move(f.uncommitted));
  f.uncommitted.clear();
}

inline void cp_async_wait(int pending) {
  Fiber& f = runtime().fibers[runtime().current];
  while (static_cast<int>(f.groups.size()) > pending) {
    for (const PendingCopy& c : f.groups.front()) perform(c);
    f.groups.erase(f.groups.begin());
  }
}


// ---------------------------------------------------------------- sm90

inline uint32_t shared_offset(const void* ptr) {
  const Runtime& r = runtime();
  const char* p = static_cast<const char*>(ptr);
  if (r.shared_base == nullptr || p < r.shared_base || p >= r.shared_base + (1 << 18)) {
    fail("shared-memory address outside the block's shared memory");
  }
  return static_cast<uint32_t>(p - r.shared_base);
}

inline void group_barrier(GroupState& g, int count) {
  Runtime& r = runtime();
  const uint64_t generation = g.generation;
  ++r.progress;
  if (++g.arrived == count) {
    g.arrived = 0;
    ++g.generation;
    return;
  }
  while (g.generation == generation) yield();
}

inline void named_barrier(int id, int count) {
  if (id < 0 || id >= 16 || count % 32 != 0) fail("bad named barrier");
  group_barrier(runtime().named[id], count);
}

inline MBarrier& mbarrier(void* bar) {
  auto it = runtime().mbarriers.find(reinterpret_cast<uintptr_t>(bar));
  if (it == runtime().mbarriers.end()) fail("mbarrier used before mbarrier.init");
  return it->second;
}

inline void mbarrier_init(void* bar, int count) {
  MBarrier b;
  b.expected = b.pending = count;
  runtime().mbarriers[reinterpret_cast<uintptr_t>(bar)] = b;
}

inline void mbarrier_maybe_complete(MBarrier& b) {
  if (b.pending < 0 || b.tx < 0) fail("mbarrier: more arrivals or transaction bytes than the phase expects");
  if (b.pending == 0 && b.tx == 0) {
    ++b.completed;
    b.pending = b.expected;
    ++runtime().progress;
  }
}

inline void mbarrier_arrive(void* bar, int64_t expect_tx) {
  MBarrier& b = mbarrier(bar);
  b.tx += expect_tx;
  --b.pending;
  ++runtime().progress;
  mbarrier_maybe_complete(b);
}

inline void mbarrier_land(MBarrier& b) {
  std::vector<TmaCopy> copies = std::move(b.in_flight);
  b.in_flight.clear();
  for (const TmaCopy& c : copies) {
    std::memcpy(c.dst, c.data.data(), c.data.size());
    b.tx -= static_cast<int64_t>(c.data.size());
    mbarrier_maybe_complete(b);
  }
}

// mbarrier.try_wait.parity in a loop: the phase of parity `parity` has completed when the
// parity of the number of completed phases differs from it.
inline void mbarrier_wait(void* bar, int parity) {
  MBarrier& b = mbarrier(bar);
  mbarrier_land(b);
  while (static_cast<int>(b.completed & 1) == parity) {
    yield();
    mbarrier_land(b);
  }
}

inline uint32_t swizzle_128b(uint32_t offset) { return offset ^ (((offset >> 7) & 7) << 4); }

inline void tma_load_4d(void* dst, const void* tensor_map, void* bar, int c0, int c1, int c2, int c3) {
  EmulatedTensorMap map;
  std::memcpy(&map, tensor_map, sizeof(map));
  if (shared_offset(dst) % 1024 != 0) fail("TMA destination with the 128-byte swizzle not 1024-byte aligned");
  if (map.box[0] * 2 != 128) fail("128-byte swizzle needs 128-byte box rows");
  TmaCopy copy{dst, std::vector<char>(size_t(map.box[0]) * map.box[1] * 2)};
  for (uint32_t row = 0; row < map.box[1]; ++row) {
    for (uint32_t e = 0; e < map.box[0]; ++e) {
      const int64_t coords[4] = {int64_t(c0) + e, int64_t(c1) + row, c2, c3};
      uint16_t value = 0;
      bool inside = true;
      for (int d = 0; d < 4; ++d) inside = inside && coords[d] >= 0 && coords[d] < int64_t(map.dims[d]);
      if (inside) {
        std::memcpy(&value, map.base + coords[0] * 2 + coords[1] * map.strides[0] + coords[2] * map.strides[1] +
                                coords[3] * map.strides[2], 2);
      }
      std::memcpy(copy.data.data() + swizzle_128b(row * 128 + e * 2), &value, 2);
    }
  }
  MBarrier& b = mbarrier(bar);
  b.in_flight.push_back(std::move(copy));
  if (runtime().copy_mode == CopyMode::kEager) mbarrier_land(b);
}

// The element at byte address `address` of shared memory seen through a 128-byte
// swizzled descriptor.
inline float shared_element(uint32_t address, bool bf16) {
  const uint32_t physical = swizzle_128b(address);
  if (physical + 2 > (1u << 18)) fail("wgmma operand outside shared memory");
  uint16_t bits;
  std::memcpy(&bits, runtime().shared_base + physical, 2);
  return element_to_float(bits, bf16);
}

struct Descriptor {
  uint32_t start, leading, stride;
};

inline Descriptor decode(uint64_t desc) {
  if ((desc >> 62) != 1) fail("wgmma descriptor: only the 128-byte swizzle is emulated");
  if (((desc >> 49) & 7) != 0) fail("wgmma descriptor: base offset must be 0 (1024-byte aligned atoms)");
  return Descriptor{static_cast<uint32_t>(desc & 0x3FFF) << 4, static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4,
                    static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4};
}

// wgmma.mma_async m64nNk16 (f32 accumulators): A (64 x 16) from registers (a != nullptr)
// or a K-major descriptor, B (16 x N) from a descriptor, K-major (trans_b false) or
// N-major. Per thread (warp w of the warpgroup, g = lane/4, t = lane%4): d[i] is row
// 16w + g + 8((i/2)%2), column 8(i/4) + 2t + i%2; A reg r holds row 16w + g + 8(r%2),
// columns 8(r/2) + 2t + {0,1}.
inline void wgmma(float* d, int n, const uint32_t* a, uint64_t desc_a, uint64_t desc_b, int accumulate, bool trans_b,
                  bool bf16) {
  Runtime& r = runtime();
  const int tid = r.current, ltid = tid % 128;
  WarpgroupState& wg = r.warpgroups[tid / 128];
  if (a != nullptr) std::memcpy(wg.a[ltid], a, 16);
  wg.descriptors[ltid][0] = desc_a;
  wg.descriptors[ltid][1] = desc_b;
  wg.accumulate[ltid] = accumulate;
  group_barrier(wg.barrier, 128);
  for (int i = 0; i < 128; ++i) {
    if (wg.descriptors[i][1] != desc_b || wg.accumulate[i] != accumulate || (a == nullptr && wg.descriptors[i][0] != desc_a)) {
      fail("wgmma operands differ across the warpgroup");
    }
  }
  auto a_at = [&](int row, int k) {
    if (a != nullptr) {
      const uint32_t reg = wg.a[32 * (row / 16) + 4 * (row % 8) + (k % 8) / 2][(row % 16) / 8 + 2 * (k / 8)];
      return element_to_float(static_cast<uint16_t>(k % 2 ? reg >> 16 : reg & 0xFFFF), bf16);
    }
    const Descriptor da = decode(desc_a);
    return shared_element(da.start + (row / 8) * da.stride + (row % 8) * 128 + k * 2, bf16);
  };
  const Descriptor db = decode(desc_b);
  auto b_at = [&](int k, int col) {
    if (!trans_b) return shared_element(db.start + (col / 8) * db.stride + (col % 8) * 128 + k * 2, bf16);
    return shared_element(db.start + (col / 64) * db.leading + (k / 8) * db.stride + (k % 8) * 128 + (col % 64) * 2,
                          bf16);
  };
  const int w = ltid / 32, g = (ltid % 32) / 4, t = ltid % 4;
  std::vector<float> result(n / 2);
  for (int i = 0; i < n / 2; ++i) {
    const int row = 16 * w + g + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * t + i % 2;
    float sum = accumulate ? d[i] : 0.f;
    for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, col);
    result[i] = sum;
  }
  group_barrier(wg.barrier, 128);
  std::memcpy(d, result.data(), sizeof(float) * result.size());
}

}  // namespace emu
}  // namespace fastattn
