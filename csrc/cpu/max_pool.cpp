// CPU max_pool2d (dilation 1): SqueezeNet's 3x3 / stride 2 / ceil_mode pooling, but any kernel,
// stride and padding. Why our own: ATen's CPU max_pool2d took 5.6 ms for a 64 x 111 x 111 NCHW map
// at 2 threads here (0.6 ms channels_last), more than all Fire modules of SqueezeNet 1.1 together.
//
// Separable: for each output row the k input rows are reduced elementwise into one row (contiguous
// loads in both layouts), then the k columns of each window (NCHW: a stride-s gather of that row,
// done with two loads and a permute for s = 1, 2; channels_last: whole channel vectors per pixel).
// Padding is -inf, so it never wins. NaN propagates like torch: a window holding a NaN gives NaN.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/max_pool_plane.h"
#include "memory_format.h"

namespace sqz {
namespace {

using pool::PoolGeom;
using pool::max_rows;
using pool::window_rows;

template <typename T>
void pool_nchw(const T* x, T* y, const PoolGeom& g, bool wide) {
  const bool fast3s2 = pool::fast3s2_applies<T>(g, wide);
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t b, int64_t e) {
    std::vector<T> row = pool::plane_scratch<T>(g);
    for (int64_t plane = b; plane < e; ++plane)
      pool::pool_plane(x + plane * g.H * g.W, y + plane * g.Ho * g.Wo, g, row, wide, fast3s2);
  });
}

template <typename T>
void pool_channels_last(const T* x, T* y, const PoolGeom& g, bool wide) {
  const int64_t C = g.C;
  const int64_t pixels = std::max((g.Wo - 1) * g.sw + g.kw, g.pw + g.W);  // of the padded row
  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t b, int64_t e) {
    std::vector<T> row(pixels * C, -std::numeric_limits<T>::infinity());
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / g.Ho, oy = t % g.Ho;
      int64_t r0, r1;
      window_rows(g, oy, r0, r1);
      const T* xn = x + n * g.H * g.W * C;
      max_rows(xn + r0 * g.W * C, g.W * C, r1 - r0, g.W * C, row.data() + g.pw * C, wide);
      T* yr = y + (n * g.Ho + oy) * g.Wo * C;
      for (int64_t ox = 0; ox < g.Wo; ++ox)  // the kw pixels of the window, whole channel rows
        max_rows(row.data() + ox * g.sw * C, C, g.kw, C, yr + ox * C, wide);
    }
  });
}

at::Tensor max_pool2d_cpu(const at::Tensor& x_in, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, bool ceil_mode) {
  const char* op = "max_pool2d";
  TORCH_CHECK(x_in.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x_in.dim(), "-D");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x_in.scalar_type());
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1, op,
              ": kernel_size must be two positive ints, got ", kernel_size);
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op,
              ": stride must be two positive ints, got ", stride);
  // padding <= kernel / 2 (torch's rule), tested without multiplying: 2 * padding can wrap
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0 &&
                  padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2,
              op, ": padding must be two ints in [0, kernel_size / 2], got ", padding,
              " for kernel_size ", kernel_size);
  // as torch: an empty image has no window to pool, even when padded (its padded rows would be
  // read from an empty x)
  TORCH_CHECK(x_in.size(2) >= 1 && x_in.size(3) >= 1, op,
              ": x must have at least one row and one column, got ", x_in.sizes());
  PoolGeom g{x_in.size(0), x_in.size(1), x_in.size(2), x_in.size(3), kernel_size[0], kernel_size[1],
             stride[0], stride[1], padding[0], padding[1], 0, 0};
  TORCH_CHECK(g.H + 2 * g.ph >= g.kh && g.W + 2 * g.pw >= g.kw, op, ": kernel_size ", kernel_size,
              " is larger than the padded input ", x_in.sizes());
  g.Ho = pool::pooled_size(g.H, g.kh, g.sh, g.ph, ceil_mode);
  g.Wo = pool::pooled_size(g.W, g.kw, g.sw, g.pw, ceil_mode);
  const at::MemoryFormat fmt = output_memory_format(x_in);
  at::Tensor y = at::empty({g.N, g.C, g.Ho, g.Wo}, x_in.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  const at::Tensor x = x_in.contiguous(fmt);  // a copy only for other strides
  const bool wide = active_isa() == Isa::Avx512;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_pool2d", [&] {
    if (fmt == at::MemoryFormat::ChannelsLast) {
      pool_channels_last(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g, wide);
    } else {
      pool_nchw(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g, wide);
    }
  });
  return y;
}

}  // namespace
}  // namespace sqz

TORCH_LIBRARY_IMPL(sqz_kernels, CPU, m) {
  m.impl("max_pool2d", &sqz::max_pool2d_cpu);
}
