"""Typed wrappers, fake kernels and autograd for the sparse-codebook ops (issue 5).

Resident compressed form of a weight W [O, I, kh, kw] (Linear: [O, I]); rows are W.reshape(O, K),
K = I*kh*kw in (ci, ky, kx) order:

- ``codebook``   float [n], n <= 256 (same dtype as x)
- ``codes``      uint8 [E], one per entry, code < n (a filler's code is ignored)
- ``gaps``       uint8 [E]; per row the cursor starts at -1; gap 255 is a filler (cursor += 255, no
  weight), otherwise cursor += gap + 1 and W[r, cursor] = codebook[code]
- ``row_counts`` int32 [O], entries per row including fillers, sum == E
- ``bias``       [O] or None

The forward kernels execute this form directly (never a dense float weight). The backward decodes
the weight with ATen ops (``codebook_decode``) to form dL/dx and dL/dcodebook
(dL/dC_k = sum of dL/dW over the positions whose code is k).
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _C  # noqa: F401  (loads the .so, which registers the ops)
from . import ops as _ops  # the memory-format rule shared with fused_fire (used at call time)
from .compression.resident import entry_cursors  # the one stream decoder

__all__ = [
    "codebook_conv2d",
    "codebook_conv2d_max_pool",
    "codebook_conv2d_global_avg_pool",
    "codebook_linear",
    "codebook_fused_fire",
    "codebook_fused_fire_max_pool",
    "codebook_decode",
    "codebook_positions",
    "codebook_fire_reference",
]

_IntPair = Union[int, Sequence[int]]


def _pair(v: _IntPair, name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t  # type: ignore[return-value]


def _pair_list(v: _IntPair, name: str) -> list:
    # `type(v) is int` first: a 13x13 1x1 layer at 10 % is ~30 us a call, and the generic path for
    # its three int pairs was ~2 us of it. (A bool is not `type(v) is int`: it takes the generic
    # path, as before.)
    return [v, v] if type(v) is int else list(_pair(v, name))


def _conv_args(x, codebook, codes, gaps, row_counts, bias, kernel_size, stride, padding, relu):
    """The leading arguments every codebook conv op's schema shares, ints as [h, w] lists."""
    # Int pairs inline: a Python call is ~0.2 us here, and the three _pair_list calls were ~0.6 us
    # of the ~4-6 us the wrapper added to a ~40 us 13x13 1x1 layer at 10 % (same-process A/B).
    k = [kernel_size, kernel_size] if type(kernel_size) is int else _pair_list(kernel_size, "kernel_size")
    s = [stride, stride] if type(stride) is int else _pair_list(stride, "stride")
    p = [padding, padding] if type(padding) is int else _pair_list(padding, "padding")
    return (x, codebook, codes, gaps, row_counts, bias, k, s, p,
            relu if type(relu) is bool else bool(relu))


# The op handles, looked up once (torch.ops.<ns>.<op> is ~0.6-0.8 us a call).
_OPS = torch.ops.sqz_kernels
_CONV2D = _OPS.codebook_conv2d
_CONV2D_MAX_POOL = _OPS.codebook_conv2d_max_pool
_CONV2D_MEAN = _OPS.codebook_conv2d_global_avg_pool
_LINEAR = _OPS.codebook_linear
_FIRE = _OPS.codebook_fused_fire
_FIRE_MAX_POOL = _OPS.codebook_fused_fire_max_pool


def codebook_conv2d(
    x: Tensor,
    codebook: Tensor,
    codes: Tensor,
    gaps: Tensor,
    row_counts: Tensor,
    bias: Optional[Tensor] = None,
    kernel_size: _IntPair = 1,
    stride: _IntPair = 1,
    padding: _IntPair = 0,
    relu: bool = False,
    dilation: _IntPair = 1,
    groups: int = 1,
) -> Tensor:
    """act(conv2d(x, W, bias, stride, padding)) with W in the resident codebook form; act = ReLU if
    ``relu``. Output in x's memory format. Only dilation 1 and groups 1 are supported."""
    if dilation != 1 and _pair(dilation, "dilation") != (1, 1):
        raise ValueError(f"codebook_conv2d: only dilation=1 is supported, got {dilation!r}")
    if groups != 1:
        raise ValueError(f"codebook_conv2d: only groups=1 is supported, got {groups!r}")
    return _ops.call_op(_CONV2D,
                        _conv_args(x, codebook, codes, gaps, row_counts, bias, kernel_size, stride,
                                   padding, relu),
                        (x, codebook, bias))


def _pool_args(pool_kernel: _IntPair, pool_stride: Optional[_IntPair]):
    """[kh, kw], [sh, sw] of the fused max-pool ops (stride None = the kernel, like torch)."""
    pk = _pair_list(pool_kernel, "pool_kernel")
    return pk, pk if pool_stride is None else _pair_list(pool_stride, "pool_stride")


def codebook_conv2d_max_pool(
    x: Tensor,
    codebook: Tensor,
    codes: Tensor,
    gaps: Tensor,
    row_counts: Tensor,
    bias: Optional[Tensor] = None,
    kernel_size: _IntPair = 1,
    stride: _IntPair = 1,
    padding: _IntPair = 0,
    relu: bool = False,
    pool_kernel: _IntPair = 3,
    pool_stride: Optional[_IntPair] = None,
    pool_ceil_mode: bool = False,
) -> Tensor:
    """max_pool2d(codebook_conv2d(x, ..., relu), pool_kernel, pool_stride (default: pool_kernel),
    padding 0, ceil_mode=pool_ceil_mode), computed by one kernel that pools each band of the conv
    output while it is in cache (the full conv output is never written). Output in x's format."""
    return _ops.call_op(_CONV2D_MAX_POOL,
                        _conv_args(x, codebook, codes, gaps, row_counts, bias, kernel_size, stride,
                                   padding, relu)
                        + (*_pool_args(pool_kernel, pool_stride), bool(pool_ceil_mode)),
                        (x, codebook, bias))


def codebook_linear(x: Tensor, codebook: Tensor, codes: Tensor, gaps: Tensor, row_counts: Tensor,
                    bias: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """act(x @ W.T + bias) for x [..., K] with W [O, K] in the resident codebook form."""
    return _ops.call_op(_LINEAR,
                        (x, codebook, codes, gaps, row_counts, bias, bool(relu)), (x, codebook, bias))


def codebook_conv2d_global_avg_pool(
    x: Tensor,
    codebook: Tensor,
    codes: Tensor,
    gaps: Tensor,
    row_counts: Tensor,
    bias: Optional[Tensor] = None,
    kernel_size: _IntPair = 1,
    stride: _IntPair = 1,
    padding: _IntPair = 0,
    relu: bool = False,
) -> Tensor:
    """adaptive_avg_pool2d(codebook_conv2d(x, ..., relu), 1): [N, O, 1, 1], computed by one kernel
    whose epilogue sums each output tile instead of storing it (the conv output is never written)."""
    return _ops.call_op(_CONV2D_MEAN,
                        _conv_args(x, codebook, codes, gaps, row_counts, bias, kernel_size, stride,
                                   padding, relu),
                        (x, codebook, bias))


def codebook_fused_fire(x: Tensor,
                        sq_codebook: Tensor, sq_codes: Tensor, sq_gaps: Tensor, sq_counts: Tensor,
                        sq_bias: Optional[Tensor],
                        e1_codebook: Tensor, e1_codes: Tensor, e1_gaps: Tensor, e1_counts: Tensor,
                        e1_bias: Optional[Tensor],
                        e3_codebook: Tensor, e3_codes: Tensor, e3_gaps: Tensor, e3_counts: Tensor,
                        e3_bias: Optional[Tensor]) -> Tensor:
    """The Fire module (squeeze 1x1+ReLU -> expand1x1+ReLU || expand3x3 pad 1+ReLU -> concat) on
    three codebook-compressed weights, computed by one fused kernel. Output in x's memory format."""
    return _ops.call_op(_FIRE,
                        (x, sq_codebook, sq_codes, sq_gaps, sq_counts, sq_bias, e1_codebook, e1_codes,
                         e1_gaps, e1_counts, e1_bias, e3_codebook, e3_codes, e3_gaps, e3_counts, e3_bias),
                        (x, sq_codebook, sq_bias, e1_codebook, e1_bias, e3_codebook, e3_bias))


def codebook_fused_fire_max_pool(x: Tensor,
                                 sq_codebook: Tensor, sq_codes: Tensor, sq_gaps: Tensor,
                                 sq_counts: Tensor, sq_bias: Optional[Tensor],
                                 e1_codebook: Tensor, e1_codes: Tensor, e1_gaps: Tensor,
                                 e1_counts: Tensor, e1_bias: Optional[Tensor],
                                 e3_codebook: Tensor, e3_codes: Tensor, e3_gaps: Tensor,
                                 e3_counts: Tensor, e3_bias: Optional[Tensor],
                                 pool_kernel: _IntPair = 3, pool_stride: Optional[_IntPair] = None,
                                 pool_ceil_mode: bool = False) -> Tensor:
    """max_pool2d(codebook_fused_fire(x, ...), pool_kernel, pool_stride (default: pool_kernel),
    padding 0, ceil_mode=pool_ceil_mode) in one kernel: each band of the Fire output is pooled
    while in cache and the full Fire output is never written. Output in x's memory format."""
    return _ops.call_op(_FIRE_MAX_POOL,
                        (x, sq_codebook, sq_codes, sq_gaps, sq_counts, sq_bias, e1_codebook, e1_codes,
                         e1_gaps, e1_counts, e1_bias, e3_codebook, e3_codes, e3_gaps, e3_counts, e3_bias,
                         *_pool_args(pool_kernel, pool_stride), bool(pool_ceil_mode)),
                        (x, sq_codebook, sq_bias, e1_codebook, e1_bias, e3_codebook, e3_bias))


# ------------------------------------------------------------------------------------------------
# Decoding with ATen ops (backward, reference). Shape-static: no data-dependent sizes, so it traces.
# ------------------------------------------------------------------------------------------------
def codebook_positions(gaps: Tensor, row_counts: Tensor, K: int) -> Tuple[Tensor, Tensor]:
    """(flat, valid): flat[e] = row*K + cursor of entry e in a [O*K] weight, or O*K for a filler;
    valid[e] is False for fillers. Assumes a validated stream."""
    valid, row, cursor = entry_cursors(gaps, row_counts)
    O = row_counts.shape[0]
    flat = torch.where(valid, row * K + cursor, torch.full_like(cursor, O * K))
    return flat, valid


def codebook_decode(codebook: Tensor, codes: Tensor, gaps: Tensor, row_counts: Tensor, K: int) -> Tensor:
    """The dense [O, K] weight of a resident codebook stream (for backward and tests only)."""
    O = row_counts.shape[0]
    flat, valid = codebook_positions(gaps, row_counts, K)
    c = torch.where(valid, codes.to(torch.int64), torch.zeros_like(flat))
    w = codebook.new_zeros(O * K + 1).index_add(0, flat, codebook[c])
    return w[: O * K].reshape(O, K)


def _grad_codebook(codebook: Tensor, codes: Tensor, gaps: Tensor, row_counts: Tensor, K: int,
                   grad_w: Tensor) -> Tensor:
    flat, valid = codebook_positions(gaps, row_counts, K)
    c = torch.where(valid, codes.to(torch.int64), torch.zeros_like(flat))
    gw = torch.cat([grad_w.reshape(-1), grad_w.new_zeros(1)])
    return codebook.new_zeros(codebook.shape[0]).index_add(0, c, gw[flat])


def codebook_fire_reference(x, sq, e1, e3) -> Tensor:
    """Eager definition of codebook_fused_fire: each of sq/e1/e3 is (codebook, codes, gaps,
    row_counts, bias); decodes to dense and uses F.conv2d + cat."""
    C = x.shape[1]
    S = sq[3].shape[0]
    w_sq = codebook_decode(*sq[:4], C).reshape(S, C, 1, 1)
    w_e1 = codebook_decode(*e1[:4], S).reshape(-1, S, 1, 1)
    w_e3 = codebook_decode(*e3[:4], 9 * S).reshape(-1, S, 3, 3)
    s = F.relu(F.conv2d(x, w_sq, sq[4]))
    return torch.cat([F.relu(F.conv2d(s, w_e1, e1[4])), F.relu(F.conv2d(s, w_e3, e3[4], padding=1))], 1)


# ------------------------------------------------------------------------------------------------
# Fake kernels
# ------------------------------------------------------------------------------------------------
@torch.library.register_fake("sqz_kernels::codebook_conv2d")
def _conv_fake(x, codebook, codes, gaps, row_counts, bias, kernel_size, stride, padding, relu):
    torch._check(x.dim() == 4, lambda: "codebook_conv2d: x must be 4-D [N, C, H, W]")
    n, _, h, w = x.shape
    ho = (h + 2 * padding[0] - kernel_size[0]) // stride[0] + 1
    wo = (w + 2 * padding[1] - kernel_size[1]) // stride[1] + 1
    out = x.new_empty((n, row_counts.shape[0], ho, wo))
    return out.contiguous(memory_format=_ops._memory_format(x))


def _pooled_fake(x, y, pool_kernel, pool_stride, ceil_mode):
    """The fused max-pool ops' output for a layer output shaped like y (padding 0)."""
    n, o, h, w = y.shape
    out = x.new_empty((n, o, _ops._pooled_size(h, pool_kernel[0], pool_stride[0], 0, ceil_mode),
                       _ops._pooled_size(w, pool_kernel[1], pool_stride[1], 0, ceil_mode)))
    return out.contiguous(memory_format=_ops._memory_format(x))


@torch.library.register_fake("sqz_kernels::codebook_conv2d_max_pool")
def _conv_pool_fake(x, codebook, codes, gaps, row_counts, bias, kernel_size, stride, padding, relu,
                    pool_kernel, pool_stride, pool_ceil_mode):
    y = _conv_fake(x, codebook, codes, gaps, row_counts, bias, kernel_size, stride, padding, relu)
    return _pooled_fake(x, y, pool_kernel, pool_stride, pool_ceil_mode)


@torch.library.register_fake("sqz_kernels::codebook_conv2d_global_avg_pool")
def _conv_mean_fake(x, codebook, codes, gaps, row_counts, bias, kernel_size, stride, padding, relu):
    torch._check(x.dim() == 4, lambda: "codebook_conv2d_global_avg_pool: x must be 4-D [N, C, H, W]")
    return x.new_empty((x.shape[0], row_counts.shape[0], 1, 1))


@torch.library.register_fake("sqz_kernels::codebook_linear")
def _linear_fake(x, codebook, codes, gaps, row_counts, bias, relu):
    return x.new_empty((*x.shape[:-1], row_counts.shape[0]))


@torch.library.register_fake("sqz_kernels::codebook_fused_fire")
def _fire_fake(x, sq_codebook, sq_codes, sq_gaps, sq_counts, sq_bias, e1_codebook, e1_codes,
               e1_gaps, e1_counts, e1_bias, e3_codebook, e3_codes, e3_gaps, e3_counts, e3_bias):
    torch._check(x.dim() == 4, lambda: "codebook_fused_fire: x must be 4-D [N, C, H, W]")
    n, _, h, w = x.shape
    out = x.new_empty((n, e1_counts.shape[0] + e3_counts.shape[0], h, w))
    return out.contiguous(memory_format=_ops._memory_format(x))


@torch.library.register_fake("sqz_kernels::codebook_fused_fire_max_pool")
def _fire_pool_fake(x, *args):
    streams, (pool_kernel, pool_stride, ceil_mode) = args[:15], args[15:]
    return _pooled_fake(x, _fire_fake(x, *streams), pool_kernel, pool_stride, ceil_mode)


# ------------------------------------------------------------------------------------------------
# Autograd: dL/dx, dL/dcodebook, dL/dbias (codes, gaps, row_counts are integer state).
# ------------------------------------------------------------------------------------------------
def _conv_setup(ctx, inputs, output):
    x, codebook, codes, gaps, row_counts, bias, kernel_size, stride, padding, relu = inputs
    ctx.geom = (list(kernel_size), list(stride), list(padding), bool(relu), bias is not None)
    # the ReLU's mask, not the output: a caller may change the output in place (out += x)
    ctx.save_for_backward(x, codebook, codes, gaps, row_counts, output > 0 if relu else None)


def _conv_backward(ctx, grad):
    x, codebook, codes, gaps, row_counts, out = ctx.saved_tensors
    kernel_size, stride, padding, relu, has_bias = ctx.geom
    return _conv_grads(ctx.needs_input_grad, x, codebook, codes, gaps, row_counts, out, grad,
                       kernel_size, stride, padding, relu, has_bias)


def _conv_grads(need, x, codebook, codes, gaps, row_counts, out, grad, kernel_size, stride, padding,
                relu, has_bias):
    """Gradients of codebook_conv2d's inputs; `out` is its (post-ReLU) output, needed if relu."""
    if relu:
        grad = grad * (out > 0).to(grad.dtype)
    O, C = row_counts.shape[0], x.shape[1]
    K = C * kernel_size[0] * kernel_size[1]
    wshape = (O, C, kernel_size[0], kernel_size[1])
    gx = gcb = gb = None
    if need[0]:
        w = codebook_decode(codebook, codes, gaps, row_counts, K).reshape(wshape)
        gx = torch.nn.grad.conv2d_input(x.shape, w, grad, stride=stride, padding=padding)
    if need[1]:
        gw = torch.nn.grad.conv2d_weight(x, wshape, grad, stride=stride, padding=padding)
        gcb = _grad_codebook(codebook, codes, gaps, row_counts, K, gw)
    if has_bias and need[5]:
        gb = grad.sum((0, 2, 3))
    return gx, gcb, None, None, None, gb, None, None, None, None


torch.library.register_autograd("sqz_kernels::codebook_conv2d", _ops.autocast_off(_conv_backward), setup_context=_conv_setup)


def _recompute_setup(ctx, inputs, output):
    """Setup of the fused conv + pool ops, whose backward recomputes the conv output (never kept)."""
    x, codebook, codes, gaps, row_counts, bias, kernel_size, stride, padding, relu = inputs[:10]
    ctx.geom = (list(kernel_size), list(stride), list(padding), bool(relu), bias is not None)
    ctx.save_for_backward(x, codebook, codes, gaps, row_counts, bias)


def _recomputed_conv_grads(ctx, grad_of_y):
    """codebook_conv2d's gradients for the conv output y recomputed with the forward kernel;
    grad_of_y(y) maps the fused op's output gradient to dL/dy."""
    x, codebook, codes, gaps, row_counts, bias = ctx.saved_tensors
    kernel_size, stride, padding, relu, has_bias = ctx.geom
    y = torch.ops.sqz_kernels.codebook_conv2d(x.detach(), codebook.detach(), codes, gaps, row_counts,
                                              None if bias is None else bias.detach(), kernel_size,
                                              stride, padding, relu)
    return _conv_grads(ctx.needs_input_grad, x, codebook, codes, gaps, row_counts, y, grad_of_y(y),
                       kernel_size, stride, padding, relu, has_bias)


def _conv_pool_setup(ctx, inputs, output):
    _recompute_setup(ctx, inputs, output)
    ctx.pool = (list(inputs[10]), list(inputs[11]), bool(inputs[12]))


def _conv_pool_backward(ctx, grad):
    # Route the gradient through ATen's max-pool backward (its argmax indices, so ties go where
    # torch sends them), then take codebook_conv2d's gradients.
    pk, ps, ceil_mode = ctx.pool
    grads = _recomputed_conv_grads(
        ctx, lambda y: _ops._max_pool_input_grad(grad, y, pk, ps, [0, 0], ceil_mode))
    return grads + (None, None, None)


torch.library.register_autograd("sqz_kernels::codebook_conv2d_max_pool", _ops.autocast_off(_conv_pool_backward),
                                setup_context=_conv_pool_setup)


def _conv_mean_backward(ctx, grad):
    # the average pool spreads grad / (Ho * Wo) over every output pixel
    return _recomputed_conv_grads(ctx, lambda y: (grad / (y.shape[2] * y.shape[3])).expand(y.shape))


torch.library.register_autograd("sqz_kernels::codebook_conv2d_global_avg_pool", _ops.autocast_off(_conv_mean_backward),
                                setup_context=_recompute_setup)


def _linear_setup(ctx, inputs, output):
    x, codebook, codes, gaps, row_counts, bias, relu = inputs
    ctx.flags = (bool(relu), bias is not None)
    ctx.save_for_backward(x, codebook, codes, gaps, row_counts, output > 0 if relu else None)


def _linear_backward(ctx, grad):
    x, codebook, codes, gaps, row_counts, out = ctx.saved_tensors
    relu, has_bias = ctx.flags
    if relu:
        grad = grad * (out > 0).to(grad.dtype)
    O, K = row_counts.shape[0], x.shape[-1]
    g2 = grad.reshape(-1, O)
    gx = gcb = gb = None
    if ctx.needs_input_grad[0]:
        w = codebook_decode(codebook, codes, gaps, row_counts, K)
        gx = (g2 @ w).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        gw = g2.t() @ x.reshape(-1, K)
        gcb = _grad_codebook(codebook, codes, gaps, row_counts, K, gw)
    if has_bias and ctx.needs_input_grad[5]:
        gb = g2.sum(0)
    return gx, gcb, None, None, None, gb, None


torch.library.register_autograd("sqz_kernels::codebook_linear", _ops.autocast_off(_linear_backward), setup_context=_linear_setup)


def _fire_setup(ctx, inputs, output):
    x = inputs[0]
    ctx.has_bias = tuple(inputs[i] is not None for i in (5, 10, 15))
    # the Fire's ReLU mask, not its output: a bypass (out += x) changes the output in place
    ctx.save_for_backward(x, *inputs[1:5], *inputs[6:10], *inputs[11:15],
                          *(b if b is not None else None for b in (inputs[5], inputs[10])), output > 0)


def _fire_backward(ctx, grad):
    return _fire_grads(ctx.needs_input_grad, ctx.has_bias, ctx.saved_tensors, grad)


def _fire_grads(need, has_bias, saved, grad):
    """Gradients of codebook_fused_fire's 16 inputs; saved = (x, the three streams without bias,
    b_sq, b_e1, the Fire output or its mask output > 0)."""
    (x, sq_cb, sq_codes, sq_gaps, sq_counts, e1_cb, e1_codes, e1_gaps, e1_counts,
     e3_cb, e3_codes, e3_gaps, e3_counts, b_sq, b_e1, out) = saved
    nn_grad = torch.nn.grad
    C = x.shape[1]
    S, E1 = sq_counts.shape[0], e1_counts.shape[0]
    w_sq = codebook_decode(sq_cb, sq_codes, sq_gaps, sq_counts, C).reshape(S, C, 1, 1)
    w_e1 = codebook_decode(e1_cb, e1_codes, e1_gaps, e1_counts, S).reshape(E1, S, 1, 1)
    w_e3 = codebook_decode(e3_cb, e3_codes, e3_gaps, e3_counts, 9 * S).reshape(-1, S, 3, 3)
    s = F.relu(F.conv2d(x, w_sq, b_sq))
    g = grad * (out > 0).to(grad.dtype)
    g1, g3 = g[:, :E1], g[:, E1:]
    gs = nn_grad.conv2d_input(s.shape, w_e1, g1) + nn_grad.conv2d_input(s.shape, w_e3, g3, padding=1)
    gs = gs * (s > 0).to(gs.dtype)
    gx = nn_grad.conv2d_input(x.shape, w_sq, gs) if need[0] else None
    g_sq = g_e1 = g_e3 = None
    if need[1]:
        g_sq = _grad_codebook(sq_cb, sq_codes, sq_gaps, sq_counts, C,
                              nn_grad.conv2d_weight(x, w_sq.shape, gs))
    if need[6]:
        g_e1 = _grad_codebook(e1_cb, e1_codes, e1_gaps, e1_counts, S,
                              nn_grad.conv2d_weight(s, w_e1.shape, g1))
    if need[11]:
        g_e3 = _grad_codebook(e3_cb, e3_codes, e3_gaps, e3_counts, 9 * S,
                              nn_grad.conv2d_weight(s, w_e3.shape, g3, padding=1))
    hb_sq, hb_e1, hb_e3 = has_bias
    gb_sq = gs.sum((0, 2, 3)) if hb_sq and need[5] else None
    gb_e1 = g1.sum((0, 2, 3)) if hb_e1 and need[10] else None
    gb_e3 = g3.sum((0, 2, 3)) if hb_e3 and need[15] else None
    return (gx, g_sq, None, None, None, gb_sq, g_e1, None, None, None, gb_e1,
            g_e3, None, None, None, gb_e3)


torch.library.register_autograd("sqz_kernels::codebook_fused_fire", _ops.autocast_off(_fire_backward), setup_context=_fire_setup)


def _fire_pool_setup(ctx, inputs, output):
    ctx.has_bias = tuple(inputs[i] is not None for i in (5, 10, 15))
    ctx.pool = (list(inputs[16]), list(inputs[17]), bool(inputs[18]))
    ctx.save_for_backward(*inputs[:16])


def _fire_pool_backward(ctx, grad):
    # As for codebook_conv2d_max_pool: recompute the Fire output with the forward kernel, route the
    # gradient through ATen's max-pool backward, then take codebook_fused_fire's gradients.
    inputs = ctx.saved_tensors
    pk, ps, ceil_mode = ctx.pool
    y = torch.ops.sqz_kernels.codebook_fused_fire(*[t.detach() if t is not None else None for t in inputs])
    gy = _ops._max_pool_input_grad(grad, y, pk, ps, [0, 0], ceil_mode)
    saved = (inputs[0], *inputs[1:5], *inputs[6:10], *inputs[11:15], inputs[5], inputs[10], y)
    return _fire_grads(ctx.needs_input_grad, ctx.has_bias, saved, gy) + (None, None, None)


torch.library.register_autograd("sqz_kernels::codebook_fused_fire_max_pool", _ops.autocast_off(_fire_pool_backward),
                                setup_context=_fire_pool_setup)
