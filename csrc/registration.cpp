// Every op schema of sqz_kernels, defined once. Backends add implementations with
// TORCH_LIBRARY_IMPL(sqz_kernels, <Backend>, m) in csrc/cpu/*.cpp and csrc/cuda/*.cu.
#include <torch/library.h>

#include <string>

namespace sqz {
// Defined in csrc/cpu/isa.cpp: the CPU instruction-set switch is not a tensor op, so it is
// registered here as a catch-all kernel together with its schema.
std::string cpu_isa();
void set_cpu_isa(const std::string& isa);
}  // namespace sqz

TORCH_LIBRARY(sqz_kernels, m) {
  // squeeze 1x1 + ReLU -> (expand 1x1 + ReLU || expand 3x3 pad 1 + ReLU) -> channel concat.
  m.def(
      "fused_fire(Tensor x, Tensor w_sq, Tensor? b_sq, Tensor w_e1, Tensor? b_e1, "
      "Tensor w_e3, Tensor? b_e3) -> Tensor");
  // Which CPU instruction set the kernels of this build run ("avx512", "avx2" or "scalar").
  m.def("cpu_isa() -> str", &sqz::cpu_isa);
  // Restrict the CPU kernels to a narrower instruction set (for tests and comparisons).
  m.def("set_cpu_isa(str isa) -> ()", &sqz::set_cpu_isa);
}

#ifndef SQZ_NO_PYTHON
#include <Python.h>
// The extension is imported from Python only to load the .so (which runs the registrations
// above); it defines no Python functions of its own. The CMake (LibTorch) build has no Python.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
