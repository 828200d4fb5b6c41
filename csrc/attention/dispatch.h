// Which attention forward runs, and why: the host-side choice between the Hopper forward
// (sm90a: TMA, wgmma) and the sm80 forward, in plain C++ (no CUDA or torch headers) so
// that it is compiled and checked on any machine (tests/cuda_emulation/dispatch_check.cpp)
// and read back through fastattn_cuda::attention_last_forward / attention_forward_counts.
#pragma once

#include <cstdint>

namespace fastattn {
namespace attention {

// What a forward call ran: the Hopper kernel, or the sm80 kernel for one of these reasons.
// The values index attention_forward_counts(); kForwardOutcomes is their number.
enum class FwdOutcome : int32_t {
  kSm90 = 0,           // the Hopper forward
  kSm80NotSm90,        // the device is not compute capability 9.0
  kSm80Pinned,         // FASTATTN_ATTENTION_CUDA_KERNEL=sm80
  kSm80NoSm90aCode,    // the code loaded for this device has no Hopper kernel body (no 9.0a in the build)
  kSm80TmaQ,           // TMA cannot describe q
  kSm80TmaK,           // ... k
  kSm80TmaV,           // ... v
  kSm80TmaRefused,     // the driver refused a tensor map, or has no cuTensorMapEncodeTiled
};
constexpr int kForwardOutcomes = 8;

inline const char* describe(FwdOutcome outcome) {
  switch (outcome) {
    case FwdOutcome::kSm90:
      return "sm90";
    case FwdOutcome::kSm80NotSm90:
      return "sm80: the device is not compute capability 9.0";
    case FwdOutcome::kSm80Pinned:
      return "sm80: pinned by FASTATTN_ATTENTION_CUDA_KERNEL=sm80";
    case FwdOutcome::kSm80NoSm90aCode:
      return "sm80: fastattn._C has no sm_90a code for this device (build with 9.0a in TORCH_CUDA_ARCH_LIST)";
    case FwdOutcome::kSm80TmaQ:
      return "sm80: TMA cannot describe q (a stride of 0, e.g. from expand, or not a multiple of 16 bytes)";
    case FwdOutcome::kSm80TmaK:
      return "sm80: TMA cannot describe k (a stride of 0, e.g. from expand, or not a multiple of 16 bytes)";
    case FwdOutcome::kSm80TmaV:
      return "sm80: TMA cannot describe v (a stride of 0, e.g. from expand, or not a multiple of 16 bytes)";
    case FwdOutcome::kSm80TmaRefused:
      return "sm80: the driver refused the Hopper forward's tensor maps (or lacks cuTensorMapEncodeTiled)";
  }
  return "unknown";
}

// The choice made before the tensors are looked at: the device's arch (10·major + minor),
// whether FASTATTN_ATTENTION_CUDA_KERNEL pins the sm80 forward, and whether the code the
// device loaded holds the Hopper kernel's body (read once per device from a device symbol).
inline FwdOutcome choose_forward(int arch, bool sm80_pinned, bool sm90a_code_loaded) {
  if (arch != 90) return FwdOutcome::kSm80NotSm90;
  if (sm80_pinned) return FwdOutcome::kSm80Pinned;
  if (!sm90a_code_loaded) return FwdOutcome::kSm80NoSm90aCode;
  return FwdOutcome::kSm90;
}

// The TMA view of a (batch, heads, rows, head_dim) tensor of 2-byte elements, strides in
// elements: dims innermost first, the byte strides of dims 1..3. A dimension of extent 1
// is never stepped over, so it gets a stride TMA accepts. `describable` is false when TMA
// cannot describe the tensor: a stride of 0 (expand) or one that is not a multiple of 16
// bytes, or one of 2^40 bytes or more.
struct TmaView {
  uint64_t dims[4];
  uint64_t byte_strides[3];
  bool describable;
};

inline TmaView tma_view(int batch, int heads, int rows, int head_dim, int64_t batch_stride, int64_t head_stride,
                        int64_t row_stride) {
  if (rows == 1) row_stride = head_dim;
  if (heads == 1) head_stride = row_stride * rows;
  if (batch == 1) batch_stride = head_stride * heads;
  TmaView view{{static_cast<uint64_t>(head_dim), static_cast<uint64_t>(rows), static_cast<uint64_t>(heads),
                static_cast<uint64_t>(batch)},
               {static_cast<uint64_t>(row_stride) * 2, static_cast<uint64_t>(head_stride) * 2,
                static_cast<uint64_t>(batch_stride) * 2},
               true};
  for (int64_t stride : {row_stride, head_stride, batch_stride}) {
    const bool ok = stride > 0 && (stride * 2) % 16 == 0 && stride * 2 < (int64_t(1) << 40);
    view.describable = view.describable && ok;
  }
  return view;
}

}  // namespace attention
}  // namespace fastattn
