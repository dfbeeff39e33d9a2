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
  // Max pooling with dilation 1 (SqueezeNet's 3x3 / stride 2 / ceil_mode pools): torch's padding
  // and ceil_mode rules, -inf padding, NaN propagates; the output has x's memory format.
  m.def(
      "max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode) "
      "-> Tensor");
  // Which CPU instruction set the kernels of this build run ("avx512", "avx2" or "scalar").
  m.def("cpu_isa() -> str", &sqz::cpu_isa);
  // Restrict the CPU kernels to a narrower instruction set (for tests and comparisons).
  m.def("set_cpu_isa(str isa) -> ()", &sqz::set_cpu_isa);
  // Sparse-codebook ops (issue 5): the resident Deep Compression form of a weight [O, K] is
  // codebook [n<=256] (x's dtype), codes uint8 [E], relative gaps uint8 [E] (255 = filler),
  // row_counts int32 [O]; see csrc/codebook.h. No dense float weight is ever built.
  m.def(
      "codebook_conv2d(Tensor x, Tensor codebook, Tensor codes, Tensor gaps, Tensor row_counts, "
      "Tensor? bias, int[2] kernel_size, int[2] stride, int[2] padding, bool relu) -> Tensor");
  // max_pool2d(codebook_conv2d(...), pool_kernel, pool_stride, padding 0, pool_ceil_mode) in one
  // kernel: the conv output is pooled band by band and never written whole (SqueezeNet's conv1).
  m.def(
      "codebook_conv2d_max_pool(Tensor x, Tensor codebook, Tensor codes, Tensor gaps, "
      "Tensor row_counts, Tensor? bias, int[2] kernel_size, int[2] stride, int[2] padding, "
      "bool relu, int[2] pool_kernel, int[2] pool_stride, bool pool_ceil_mode) -> Tensor");
  // adaptive_avg_pool2d(codebook_conv2d(...), 1) -> [N, O, 1, 1] in one kernel: the epilogue sums
  // each tile instead of storing it (SqueezeNet's classifier conv + global average pool).
  m.def(
      "codebook_conv2d_global_avg_pool(Tensor x, Tensor codebook, Tensor codes, Tensor gaps, "
      "Tensor row_counts, Tensor? bias, int[2] kernel_size, int[2] stride, int[2] padding, "
      "bool relu) -> Tensor");
  m.def(
      "codebook_linear(Tensor x, Tensor codebook, Tensor codes, Tensor gaps, Tensor row_counts, "
      "Tensor? bias, bool relu) -> Tensor");
  m.def(
      "codebook_fused_fire(Tensor x, Tensor sq_codebook, Tensor sq_codes, Tensor sq_gaps, "
      "Tensor sq_counts, Tensor? sq_bias, Tensor e1_codebook, Tensor e1_codes, Tensor e1_gaps, "
      "Tensor e1_counts, Tensor? e1_bias, Tensor e3_codebook, Tensor e3_codes, Tensor e3_gaps, "
      "Tensor e3_counts, Tensor? e3_bias) -> Tensor");
  // max_pool2d(codebook_fused_fire(...), pool_kernel, pool_stride, padding 0, pool_ceil_mode) in one
  // kernel: each band of the Fire output is pooled while in cache (SqueezeNet's later pools).
  m.def(
      "codebook_fused_fire_max_pool(Tensor x, Tensor sq_codebook, Tensor sq_codes, Tensor sq_gaps, "
      "Tensor sq_counts, Tensor? sq_bias, Tensor e1_codebook, Tensor e1_codes, Tensor e1_gaps, "
      "Tensor e1_counts, Tensor? e1_bias, Tensor e3_codebook, Tensor e3_codes, Tensor e3_gaps, "
      "Tensor e3_counts, Tensor? e3_bias, int[2] pool_kernel, int[2] pool_stride, "
      "bool pool_ceil_mode) -> Tensor");
}

// The Python module's init (PyInit__C) and its one function live in csrc/python_calls.cpp.
