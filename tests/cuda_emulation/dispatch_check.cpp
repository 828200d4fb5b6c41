// The host-side choice of the attention forward (csrc/attention/dispatch.h), driven line by
// line from stdin by tests/test_cuda_attention.py (plain C++: builds with g++ alone).
//
//   choose ARCH SM80_PINNED SM90A_CODE_LOADED
//       -> the description of choose_forward(...)
//   tma BATCH HEADS ROWS HEAD_DIM BATCH_STRIDE HEAD_STRIDE ROW_STRIDE
//       -> "1" when TMA can describe that (batch, heads, rows, head_dim) tensor, else "0"
//   outcomes
//       -> every outcome's description, in FwdOutcome order, then "end"
#include <cstdint>
#include <iostream>
#include <string>

#include "attention/dispatch.h"

namespace fa = fastattn::attention;

int main() {
  std::string command;
  while (std::cin >> command) {
    if (command == "choose") {
      int arch = 0, pinned = 0, loaded = 0;
      std::cin >> arch >> pinned >> loaded;
      std::cout << fa::describe(fa::choose_forward(arch, pinned != 0, loaded != 0)) << "\n";
    } else if (command == "tma") {
      int batch = 0, heads = 0, rows = 0, head_dim = 0;
      int64_t batch_stride = 0, head_stride = 0, row_stride = 0;
      std::cin >> batch >> heads >> rows >> head_dim >> batch_stride >> head_stride >> row_stride;
      std::cout << (fa::tma_view(batch, heads, rows, head_dim, batch_stride, head_stride, row_stride).describable ? 1 : 0)
                << "\n";
    } else if (command == "outcomes") {
      for (int i = 0; i < fa::kForwardOutcomes; ++i) std::cout << fa::describe(static_cast<fa::FwdOutcome>(i)) << "\n";
      std::cout << "end\n";
    } else {
      std::cerr << "unknown command " << command << "\n";
      return 2;
    }
  }
  return 0;
}
