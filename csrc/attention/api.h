// The entry points csrc/ops.cpp calls: plain C++ (no CUDA or torch headers), so that
// ops.cpp compiles against the CPU torch headers too.
#pragma once

#include <cstdint>

#include "attention/dispatch.h"
#include "attention/params.cuh"

namespace fastattn {
namespace attention {

// Each returns nullptr on success, else a message naming what failed. `stream` is a
// cudaStream_t. The kernels read the current device's compute capability: sm90 runs
// the Hopper forward where it is built, every other arch >= 8.0 the sm80 kernels.
const char* forward(const FwdParams& params, void* stream);
const char* backward(const BwdParams& params, void* stream);

// Which forward the calling thread's last forward() launched (a FwdOutcome), or -1
// before its first.
int last_forward_outcome();

// How many forward() calls of this process launched each FwdOutcome: writes
// kForwardOutcomes counts.
void forward_outcome_counts(int64_t* counts);

// The head dims the kernels are instantiated for, in increasing order; returns how
// many there are (writes at most `capacity`).
int compiled_head_dims(int* head_dims, int capacity);

}  // namespace attention
}  // namespace fastattn
