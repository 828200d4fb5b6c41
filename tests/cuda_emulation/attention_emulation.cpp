// Runs the attention kernels on the host emulator of csrc/attention/emulation.cuh, block
// by block, for tests/test_cuda_attention.py: the forward (sm80 or the Hopper kernel),
// then the sm80 backward.
//
//     attention_emulation CASE_DIR
//
// CASE_DIR/case.txt holds, whitespace separated:
//     batch heads kv_heads seqlen_q seqlen_k head_dim dtype(0 fp16, 1 bf16) scale
//     window_left window_right top_left has_dlse copy_mode(0 eager, 1 deferred)
//     reverse_warps layout(0 contiguous, 1 (b, s, h, d) with padded rows)
//     forward(0 sm80, 1 sm90)
// and CASE_DIR/{q,k,v,dout}.bin the contiguous (b, h, s, d) inputs in dtype,
// dlse.bin (b, h, sq) fp32 when has_dlse. Writes out, lse, dq, dk, dv .bin in the
// same contiguous layouts. Tensors are placed in `layout` inside guard zones; an
// out-of-bounds write, a NaN read from poisoned shared memory, a deadlock or a
// misaligned access makes it fail (exit status != 0).
#define FASTATTN_EMULATE 1

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "attention/kernel_bwd_sm80.cuh"
#include "attention/kernel_fwd_sm80.cuh"
#include "attention/kernel_fwd_sm90.cuh"
#include "attention/traits.cuh"

namespace fa = fastattn::attention;
namespace emu = fastattn::emu;

namespace {

struct Case {
  int batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype;
  float scale;
  int window_left, window_right, top_left, has_dlse, copy_mode, reverse_warps, layout, forward;
};

constexpr int kGuard = 256;  // bytes of poison before and after every tensor

std::vector<char> read_file(const std::string& path, size_t bytes) {
  std::vector<char> data(bytes);
  std::ifstream in(path, std::ios::binary);
  if (!in || !in.read(data.data(), static_cast<std::streamsize>(bytes))) {
    std::fprintf(stderr, "cannot read %zu bytes from %s\n", bytes, path.c_str());
    std::exit(2);
  }
  return data;
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
}

// A logical (b, h, s, d) tensor of 2-byte elements placed in a guarded buffer.
struct Placed {
  std::vector<char> storage;
  int64_t batch_stride, head_stride, row_stride;
  int b, h, s, d, layout;

  Placed(int b_, int h_, int s_, int d_, int layout_) : b(b_), h(h_), s(s_), d(d_), layout(layout_) {
    if (layout_ == 0) {
      row_stride = d;
      head_stride = int64_t(s) * d;
      batch_stride = int64_t(h) * s * d;
    } else {
      row_stride = int64_t(h) * (d + 8);
      head_stride = d + 8;
      batch_stride = int64_t(s) * row_stride;
    }
    storage.assign(2 * kGuard + 2 * std::max<int64_t>(batch_stride * b, 8), char(0x7F));
  }
  uint16_t* data() { return reinterpret_cast<uint16_t*>(storage.data() + kGuard); }
  uint16_t& at(int bi, int hi, int si, int di) {
    return data()[bi * batch_stride + hi * head_stride + int64_t(si) * row_stride + di];
  }
  void fill(const std::vector<char>& contiguous) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(contiguous.data());
    for (int bi = 0; bi < b; ++bi)
      for (int hi = 0; hi < h; ++hi)
        for (int si = 0; si < s; ++si)
          for (int di = 0; di < d; ++di) at(bi, hi, si, di) = src[((int64_t(bi) * h + hi) * s + si) * d + di];
  }
  std::vector<uint16_t> contiguous() {
    std::vector<uint16_t> out(size_t(b) * h * s * d);
    for (int bi = 0; bi < b; ++bi)
      for (int hi = 0; hi < h; ++hi)
        for (int si = 0; si < s; ++si)
          for (int di = 0; di < d; ++di) out[((int64_t(bi) * h + hi) * s + si) * d + di] = at(bi, hi, si, di);
    return out;
  }
  // Guards intact, and no byte of the padding between rows written (poison 0x7F7F).
  bool guards_intact() {
    for (int i = 0; i < kGuard; ++i) {
      if (storage[i] != char(0x7F) || storage[storage.size() - 1 - i] != char(0x7F)) return false;
    }
    if (layout == 1) {
      for (int bi = 0; bi < b; ++bi)
        for (int hi = 0; hi < h; ++hi)
          for (int si = 0; si < s; ++si)
            for (int di = d; di < d + 8; ++di) {
              if (at(bi, hi, si, di) != 0x7F7F) return false;
            }
    }
    return true;
  }
};

// A block's shared memory: 1024-byte aligned (as the Hopper kernel aligns it), poisoned.
struct SharedMemory {
  std::vector<char> bytes;
  char* aligned(int size) {
    bytes.assign(size + 2048, char(0xFF));
    char* base = bytes.data();
    base += (1024 - reinterpret_cast<uintptr_t>(base) % 1024) % 1024;
    emu::runtime().shared_base = base;
    return base;
  }
};

template <int kHeadDim, typename Element, bool IsCausal>
void run_forward(const fa::FwdParams& p) {
  using Traits = fa::FwdTraitsSm80<kHeadDim, Element>;
  SharedMemory smem;
  const int m_blocks = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  for (int batch = 0; batch < p.batch; ++batch)
    for (int head = 0; head < p.heads; ++head)
      for (int m_block = 0; m_block < m_blocks; ++m_block) {
        char* s = smem.aligned(Traits::kSmemBytes);
        emu::run_block(Traits::kNThreads, [&](int tid) {
          fa::attention_fwd_block_sm80<Traits, IsCausal>(p, s, m_block, head, batch, tid);
        });
      }
}

// The emulated tensor map of a (batch, heads, rows, head_dim) tensor (see EmulatedTensorMap).
CUtensorMap tensor_map(const void* base, int batch, int heads, int rows, int head_dim, int64_t batch_stride,
                       int64_t head_stride, int64_t row_stride, int box_rows) {
  emu::EmulatedTensorMap map{static_cast<const char*>(base),
                             {uint64_t(head_dim), uint64_t(rows), uint64_t(heads), uint64_t(batch)},
                             {uint64_t(row_stride) * 2, uint64_t(head_stride) * 2, uint64_t(batch_stride) * 2},
                             {64, uint32_t(box_rows)}};
  CUtensorMap out;
  static_assert(sizeof(map) <= sizeof(out), "the emulated map fits in a CUtensorMap");
  std::memcpy(&out, &map, sizeof(map));
  return out;
}

template <int kHeadDim, typename Element, bool IsCausal>
void run_forward_sm90(const fa::FwdParams& p) {
  using Traits = fa::FwdTraitsSm90<kHeadDim, Element>;
  fa::FwdParamsSm90 params;
  params.p = p;
  params.tma_q = tensor_map(p.q, p.batch, p.heads, p.seqlen_q, kHeadDim, p.q_batch_stride, p.q_head_stride,
                            p.q_row_stride, Traits::kBlockM);
  params.tma_k = tensor_map(p.k, p.batch, p.kv_heads, p.seqlen_k, kHeadDim, p.k_batch_stride, p.k_head_stride,
                            p.k_row_stride, Traits::kBlockN);
  params.tma_v = tensor_map(p.v, p.batch, p.kv_heads, p.seqlen_k, kHeadDim, p.v_batch_stride, p.v_head_stride,
                            p.v_row_stride, Traits::kBlockN);
  SharedMemory smem;
  const int m_blocks = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  for (int batch = 0; batch < p.batch; ++batch)
    for (int head = 0; head < p.heads; ++head)
      for (int m_block = 0; m_block < m_blocks; ++m_block) {
        char* s = smem.aligned(Traits::kSmemBytes);
        emu::run_block(Traits::kNThreads, [&](int tid) {
          fa::attention_fwd_block_sm90<Traits, IsCausal>(params, s, m_block, head, batch, tid);
        });
      }
}

template <int kHeadDim, typename Element, bool IsCausal>
void run_backward(const fa::BwdParams& p) {
  using DqTraits = fa::BwdDqTraitsSm80<kHeadDim, Element>;
  using DkdvTraits = fa::BwdDkdvTraitsSm80<kHeadDim, Element>;
  constexpr int kThreads = fa::BwdPreprocessTraits::kNThreads;
  constexpr int kRows = kThreads / (kHeadDim / 8);
  SharedMemory smem;
  for (int batch = 0; batch < p.batch; ++batch)
    for (int head = 0; head < p.heads; ++head)
      for (int block = 0; block < (p.seqlen_q + kRows - 1) / kRows; ++block)
        emu::run_block(kThreads, [&](int tid) {
          fa::attention_bwd_preprocess_block<kHeadDim, Element, kThreads>(p, block, head, batch, tid);
        });
  for (int batch = 0; batch < p.batch; ++batch)
    for (int kv_head = 0; kv_head < p.kv_heads; ++kv_head)
      for (int n_block = 0; n_block < (p.seqlen_k + DkdvTraits::kBlockN - 1) / DkdvTraits::kBlockN; ++n_block) {
        char* s = smem.aligned(DkdvTraits::kSmemBytes);
        emu::run_block(DkdvTraits::kNThreads, [&](int tid) {
          fa::attention_bwd_dkdv_block_sm80<DkdvTraits, IsCausal>(p, s, n_block, kv_head, batch, tid);
        });
      }
  for (int batch = 0; batch < p.batch; ++batch)
    for (int head = 0; head < p.heads; ++head)
      for (int m_block = 0; m_block < (p.seqlen_q + DqTraits::kBlockM - 1) / DqTraits::kBlockM; ++m_block) {
        char* s = smem.aligned(DqTraits::kSmemBytes);
        emu::run_block(DqTraits::kNThreads, [&](int tid) {
          fa::attention_bwd_dq_block_sm80<DqTraits, IsCausal>(p, s, m_block, head, batch, tid);
        });
      }
}

template <int kHeadDim, typename Element, bool IsCausal>
void run_all(fa::BwdParams& p, bool sm90_forward) {
  if (sm90_forward) {
    run_forward_sm90<kHeadDim, Element, IsCausal>(p);
  } else {
    run_forward<kHeadDim, Element, IsCausal>(p);
  }
  run_backward<kHeadDim, Element, IsCausal>(p);
}

template <int kHeadDim, typename Element>
void run_all(fa::BwdParams& p, bool sm90_forward) {
  if (p.is_causal) {
    run_all<kHeadDim, Element, true>(p, sm90_forward);
  } else {
    run_all<kHeadDim, Element, false>(p, sm90_forward);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CASE_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  Case c{};
  {
    std::ifstream in(dir + "/case.txt");
    in >> c.batch >> c.heads >> c.kv_heads >> c.seqlen_q >> c.seqlen_k >> c.head_dim >> c.dtype >> c.scale >>
        c.window_left >> c.window_right >> c.top_left >> c.has_dlse >> c.copy_mode >> c.reverse_warps >> c.layout >>
        c.forward;
    if (!in) {
      std::fprintf(stderr, "cannot parse %s/case.txt\n", dir.c_str());
      return 2;
    }
  }
  emu::runtime().copy_mode = c.copy_mode ? emu::CopyMode::kDeferred : emu::CopyMode::kEager;
  emu::runtime().reverse_order = c.reverse_warps != 0;

  const int b = c.batch, h = c.heads, hk = c.kv_heads, sq = c.seqlen_q, sk = c.seqlen_k, d = c.head_dim;
  Placed q(b, h, sq, d, c.layout), k(b, hk, sk, d, c.layout), v(b, hk, sk, d, c.layout);
  Placed dout(b, h, sq, d, c.layout), out(b, h, sq, d, c.layout), dq(b, h, sq, d, c.layout);
  Placed dk(b, hk, sk, d, c.layout), dv(b, hk, sk, d, c.layout);
  q.fill(read_file(dir + "/q.bin", size_t(2) * b * h * sq * d));
  k.fill(read_file(dir + "/k.bin", size_t(2) * b * hk * sk * d));
  v.fill(read_file(dir + "/v.bin", size_t(2) * b * hk * sk * d));
  dout.fill(read_file(dir + "/dout.bin", size_t(2) * b * h * sq * d));
  std::vector<float> lse(size_t(b) * h * sq, 12345.f), delta(size_t(b) * h * sq, 12345.f), dlse;
  if (c.has_dlse) {
    std::vector<char> raw = read_file(dir + "/dlse.bin", sizeof(float) * b * h * sq);
    dlse.resize(size_t(b) * h * sq);
    std::memcpy(dlse.data(), raw.data(), raw.size());
  }

  fa::BwdParams p{};
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.lse = lse.data();
  p.q_batch_stride = q.batch_stride, p.q_head_stride = q.head_stride, p.q_row_stride = q.row_stride;
  p.k_batch_stride = k.batch_stride, p.k_head_stride = k.head_stride, p.k_row_stride = k.row_stride;
  p.v_batch_stride = v.batch_stride, p.v_head_stride = v.head_stride, p.v_row_stride = v.row_stride;
  p.out_batch_stride = out.batch_stride, p.out_head_stride = out.head_stride, p.out_row_stride = out.row_stride;
  p.lse_batch_stride = int64_t(h) * sq, p.lse_head_stride = sq;
  p.batch = b, p.heads = h, p.kv_heads = hk, p.seqlen_q = sq, p.seqlen_k = sk, p.head_dim = d;
  p.heads_per_kv_head = h / hk;
  p.dtype = c.dtype ? fa::DType::kBFloat16 : fa::DType::kFloat16;
  p.scale = c.scale;
  p.window_left = c.window_left;
  p.window_right = c.window_right;
  fa::finalize_masking(p, c.top_left != 0);
  p.dout = dout.data();
  p.dlse = c.has_dlse ? dlse.data() : nullptr;
  p.dq = dq.data();
  p.dk = dk.data();
  p.dv = dv.data();
  p.delta = delta.data();
  p.dout_batch_stride = dout.batch_stride, p.dout_head_stride = dout.head_stride, p.dout_row_stride = dout.row_stride;
  p.dlse_batch_stride = int64_t(h) * sq, p.dlse_head_stride = sq;
  p.dq_batch_stride = dq.batch_stride, p.dq_head_stride = dq.head_stride, p.dq_row_stride = dq.row_stride;
  p.dk_batch_stride = dk.batch_stride, p.dk_head_stride = dk.head_stride, p.dk_row_stride = dk.row_stride;
  p.dv_batch_stride = dv.batch_stride, p.dv_head_stride = dv.head_stride, p.dv_row_stride = dv.row_stride;
  p.delta_batch_stride = int64_t(h) * sq, p.delta_head_stride = sq;

  if (d == 64 && c.dtype == 0) {
    run_all<64, __half>(p, c.forward == 1);
  } else if (d == 64) {
    run_all<64, __nv_bfloat16>(p, c.forward == 1);
  } else if (d == 128 && c.dtype == 0) {
    run_all<128, __half>(p, c.forward == 1);
  } else if (d == 128) {
    run_all<128, __nv_bfloat16>(p, c.forward == 1);
  } else {
    std::fprintf(stderr, "head_dim %d is not instantiated\n", d);
    return 2;
  }

  for (Placed* t : {&q, &k, &v, &dout, &out, &dq, &dk, &dv}) {
    if (!t->guards_intact()) {
      std::fprintf(stderr, "a kernel wrote outside a tensor\n");
      return 3;
    }
  }
  write_file(dir + "/out.bin", out.contiguous().data(), size_t(2) * b * h * sq * d);
  write_file(dir + "/lse.bin", lse.data(), sizeof(float) * lse.size());
  write_file(dir + "/delta.bin", delta.data(), sizeof(float) * delta.size());
  write_file(dir + "/dq.bin", dq.contiguous().data(), size_t(2) * b * h * sq * d);
  write_file(dir + "/dk.bin", dk.contiguous().data(), size_t(2) * b * hk * sk * d);
  write_file(dir + "/dv.bin", dv.contiguous().data(), size_t(2) * b * hk * sk * d);
  return 0;
}
