// The torch glue of fastattn._C: the Python module entry point and the operator
// library `fastattn_cuda`, whose CUDA kernels the Python ops call for backend="cuda".
//
// The public ops (fastattn::<op>_fwd / _bwd) are torch.library custom ops defined in
// Python, where the per-call backend choice is made; the CUDA kernels register here
// under their own namespace so that a CUDA dispatch-key kernel never overrides the
// triton backend for every CUDA tensor. Kernels live in csrc/<op>/*.cu as plain CUDA
// (no torch headers) and are bound here with argument checks that name each dimension.

#include <Python.h>

#include <torch/library.h>

#include <string>

namespace fastattn {

// What this build contains: the CUDA version it was compiled with and its archs.
std::string build_info() {
  std::string info = "fastattn._C";
#ifdef CUDA_VERSION
  info += " cuda=" + std::to_string(CUDA_VERSION);
#endif
#ifdef TORCH_VERSION_MAJOR
  info += " torch=" + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
#endif
  return info;
}

}  // namespace fastattn

TORCH_LIBRARY(fastattn_cuda, m) {
  m.def("build_info() -> str", &fastattn::build_info);
}

// An importable extension module: `import fastattn._C` loads the library above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
