// CPU codebook_linear: y = act(x @ W^T + b) for x [..., K], executing the compressed weight directly.
// A linear layer is the 1x1 conv of a C = K channel, 1 x M "image" (M = rows of x): the same SpMM
// (vectors run over the rows of x; at M = 1 x is read in place, otherwise it is packed to K x M).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "codebook.h"
#include "cpu/codebook_spmm.h"

namespace sqz {
namespace codebook {
namespace {

at::Tensor codebook_linear_cpu(const at::Tensor& x, const at::Tensor& codebook,
                               const at::Tensor& codes, const at::Tensor& gaps,
                               const at::Tensor& row_counts, const c10::optional<at::Tensor>& bias,
                               bool relu) {
  const char* op = "codebook_linear";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension [..., in_features]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  const Stream s{codebook, codes, gaps, row_counts, bias};
  const int64_t O = check_stream(op, "", x, s);
  const int64_t K = x.size(-1);
  TORCH_CHECK(K >= 1, op, ": x must have at least one input feature");
  const at::Tensor x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = O;
  at::Tensor y = at::empty({M, O}, x.options());
  if (M == 0) {
    (void)validate_stream(op, "", s, K);
    return y.reshape(out_shape);
  }
  ConvGeom g;
  g.N = 1;
  g.C = K;
  g.H = 1;
  g.W = M;
  g.O = O;
  g.kh = g.kw = g.sh = g.sw = 1;
  g.ph = g.pw = 0;
  g.Ho = 1;
  g.Wo = M;
  const int64_t xs[4] = {0, x2.stride(1), 0, x2.stride(0)};
  const int64_t ys[4] = {0, 1, 0, O};
  conv_forward(x2, xs, g, s, relu, y, ys, op);
  return y.reshape(out_shape);
}

}  // namespace
}  // namespace codebook
}  // namespace sqz

TORCH_LIBRARY_IMPL(sqz_kernels, CPU, m) {
  m.impl("codebook_linear", &sqz::codebook::codebook_linear_cpu);
}
