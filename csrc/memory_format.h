// The output memory format rule shared by every op and backend (and by the fake kernels in
// sqz_kernels/ops.py): channels_last exactly when x is channels_last-contiguous and not also plain
// contiguous (e.g. an N x C x 1 x 1 tensor is both, and stays NCHW).
#pragma once

#include <ATen/core/Tensor.h>

namespace sqz {

inline at::MemoryFormat output_memory_format(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

}  // namespace sqz
