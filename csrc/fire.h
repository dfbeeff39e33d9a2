// Argument checks and geometry for the fused Fire op, shared by every backend.
//
// A Fire module is: s = relu(conv1x1(x, w_sq) + b_sq);
//                   y = cat(relu(conv1x1(s, w_e1) + b_e1), relu(conv3x3_pad1(s, w_e3) + b_e3))
// The backends differ in how they compute it; what they accept is defined here once so that a
// bad argument produces the same error message on every device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace sqz {

struct FireGeometry {
  int64_t batch, in_channels, height, width;
  int64_t squeeze, expand1, expand3;
  int64_t out_channels() const { return expand1 + expand3; }
  // Multiply-accumulates of one call (used by benchmarks and documentation).
  int64_t macs() const {
    const int64_t hw = height * width;
    return batch * hw * (in_channels * squeeze + squeeze * expand1 + 9 * squeeze * expand3);
  }
};

inline void check_bias(const c10::optional<at::Tensor>& b, const char* name, int64_t n,
                       const at::Tensor& x) {
  if (!b.has_value()) return;
  const at::Tensor& t = *b;
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "fused_fire: ", name, " must have shape [", n,
              "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fused_fire: ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fused_fire: ", name, " is on ", t.device(),
              " but x is on ", x.device());
}

inline void check_weight(const at::Tensor& w, const char* name, const at::Tensor& x) {
  TORCH_CHECK(w.dim() == 4, "fused_fire: ", name, " must be 4-D [out, in, kh, kw], got ",
              w.dim(), "-D");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "fused_fire: ", name, " has dtype ",
              w.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(w.device() == x.device(), "fused_fire: ", name, " is on ", w.device(),
              " but x is on ", x.device());
}

// Validates every argument and returns the geometry (each backend checks the dtypes it takes).
inline FireGeometry check_fire_args(const at::Tensor& x, const at::Tensor& w_sq,
                                    const c10::optional<at::Tensor>& b_sq, const at::Tensor& w_e1,
                                    const c10::optional<at::Tensor>& b_e1, const at::Tensor& w_e3,
                                    const c10::optional<at::Tensor>& b_e3) {
  TORCH_CHECK(x.dim() == 4, "fused_fire: x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  check_weight(w_sq, "w_sq", x);
  check_weight(w_e1, "w_e1", x);
  check_weight(w_e3, "w_e3", x);
  FireGeometry g;
  g.batch = x.size(0);
  g.in_channels = x.size(1);
  g.height = x.size(2);
  g.width = x.size(3);
  g.squeeze = w_sq.size(0);
  g.expand1 = w_e1.size(0);
  g.expand3 = w_e3.size(0);
  TORCH_CHECK(g.height >= 1 && g.width >= 1, "fused_fire: x must have H, W >= 1, got ",
              x.sizes());
  TORCH_CHECK(g.in_channels >= 1, "fused_fire: x must have at least one channel");
  TORCH_CHECK(g.squeeze >= 1 && g.expand1 >= 1 && g.expand3 >= 1,
              "fused_fire: every weight needs at least one output channel");
  TORCH_CHECK(w_sq.size(1) == g.in_channels && w_sq.size(2) == 1 && w_sq.size(3) == 1,
              "fused_fire: w_sq must have shape [S, ", g.in_channels, ", 1, 1] to match x, got ",
              w_sq.sizes());
  TORCH_CHECK(w_e1.size(1) == g.squeeze && w_e1.size(2) == 1 && w_e1.size(3) == 1,
              "fused_fire: w_e1 must have shape [E1, ", g.squeeze, ", 1, 1] to match w_sq, got ",
              w_e1.sizes());
  TORCH_CHECK(w_e3.size(2) == 3 && w_e3.size(3) == 3, "fused_fire: w_e3 must be a 3x3 kernel, got ",
              w_e3.sizes());
  TORCH_CHECK(w_e3.size(1) == g.squeeze, "fused_fire: w_e3 must have shape [E3, ", g.squeeze,
              ", 3, 3] to match w_sq, got ", w_e3.sizes());
  check_bias(b_sq, "b_sq", g.squeeze, x);
  check_bias(b_e1, "b_e1", g.expand1, x);
  check_bias(b_e3, "b_e3", g.expand3, x);
  return g;
}

}  // namespace sqz
