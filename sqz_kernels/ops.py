"""Typed Python wrappers over torch.ops.sqz_kernels.*, with fake (meta) kernels and autograd.

The C++ side defines every schema once (csrc/registration.cpp); this file adds what torch needs to
trace (register_fake) and differentiate (register_autograd) the ops. Minimum torch: 2.4.
"""
import functools
import threading
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad as _fwad

from . import _C  # noqa: F401  (loads the .so, which registers the ops)

__all__ = ["fused_fire", "fire_reference", "max_pool2d", "cpu_isa", "set_cpu_isa"]


# torch.library.register_autograd puts a Python kernel on the Autograd key of each op; it runs on
# every call, even in no_grad / inference, and costs ~23 us (tiny codebook_conv2d: 40 -> 17 us per
# call, measured here). When no gradient can flow, call_op dispatches below it.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
# Whether call_op uses _C.call below autograd (tests and A/B measurements switch it off).
_USE_C_CALL = True
# One attribute lookup less per call; the same function, so Dynamo still constant-folds it.
_is_compiling = torch.compiler.is_compiling
# A KernelChain trace in progress (sqz_kernels/chain.py): (thread id, list), call_op appending each
# call the tracing thread makes as (op name, args, version of args[0], output, version of the
# output), or None for a call that did not go through _C.call. None the rest of the time.
_RECORDER = None
_thread_id = threading.get_ident


def autocast_off(backward):
    """A register_autograd backward run with autocast off (as torch.amp.custom_bwd does): a
    backward called inside an autocast region had its recomputed convs / matmuls cast to bf16,
    which then met float32 operands (oneDNN: no primitive; index_add_: dtype mismatch)."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return backward(ctx, *grads)
    return run


def fwad_open() -> bool:
    """Whether a forward-mode AD level is open (one global read: the modules' per-call check)."""
    return _fwad._current_level >= 0


def has_tangent(*tensors) -> bool:
    """Whether a forward-mode AD level is open (torch.autograd.forward_ad.dual_level,
    torch.func.jvp) and one of `tensors` carries a tangent. The ops have no forward-mode formula:
    torch would drop the tangent silently, so the modules run their reference paths instead and
    call_op refuses. (A global read when no level is open.)"""
    return fwad_open() and any(
        t is not None and _fwad.unpack_dual(t).tangent is not None for t in tensors)


def call_op(op, args, grad_inputs):
    """op(*args); straight to the backend kernel when grad mode is off or no tensor of
    `grad_inputs` requires grad (never while torch.compile traces: it sees the plain op call).
    Outside tracing the call goes first to _C.call (csrc/python_calls.cpp: the same dispatcher
    call below autograd, with a ~10 us shorter Python binding), which itself checks grad mode,
    requires_grad, tensor subclasses and __torch_function__ modes, and returns NotImplemented
    when any of them needs torch.ops' handling. Those checks in C++ instead of here saved ~2 us a
    call (a generator over the inputs, torch.is_grad_enabled)."""
    if fwad_open() and has_tangent(*grad_inputs):
        raise NotImplementedError(
            f"sqz_kernels::{op.__name__}: no forward-mode AD (jvp / dual tensors); the sk modules "
            "fall back to their reference paths there, the ops do not")
    rec = _RECORDER  # read once: another thread's trace may end meanwhile
    if rec is not None and rec[0] != _thread_id():
        rec = None  # only the tracing thread's calls belong to its trace
    if _USE_C_CALL and not _is_compiling():
        v0 = args[0]._version if rec is not None else 0
        out = _C.call(op.__name__, *args)
        if out is not NotImplemented:
            if rec is not None:
                rec[1].append((op.__name__, args, v0, out, out._version))
            return out
    if rec is not None:
        rec[1].append(None)
    if _BELOW_AUTOGRAD is not None and not _is_compiling() and (
            not torch.is_grad_enabled()
            or not any(t is not None and t.requires_grad for t in grad_inputs)):
        with _BELOW_AUTOGRAD():
            return op(*args)
    return op(*args)


def fused_fire(
    x: Tensor,
    w_sq: Tensor,
    b_sq: Optional[Tensor],
    w_e1: Tensor,
    b_e1: Optional[Tensor],
    w_e3: Tensor,
    b_e3: Optional[Tensor],
) -> Tensor:
    """relu(cat(conv1x1(s, w_e1)+b_e1, conv3x3(s, w_e3, pad=1)+b_e3)) with s = relu(conv1x1(x, w_sq)+b_sq),
    computed by one fused kernel. The output has x's memory format (NCHW or channels_last)."""
    args = (x, w_sq, b_sq, w_e1, b_e1, w_e3, b_e3)
    return call_op(torch.ops.sqz_kernels.fused_fire, args, args)


def fire_reference(x, w_sq, b_sq, w_e1, b_e1, w_e3, b_e3) -> Tensor:
    """The eager definition the fused kernels must equal (ATen convs + cat)."""
    s = F.relu(F.conv2d(x, w_sq, b_sq))
    return torch.cat([F.relu(F.conv2d(s, w_e1, b_e1)), F.relu(F.conv2d(s, w_e3, b_e3, padding=1))], 1)


def cpu_isa() -> str:
    """The instruction set the CPU kernels use now: "avx512", "avx2" or "scalar"."""
    return torch.ops.sqz_kernels.cpu_isa()


def set_cpu_isa(isa: str) -> None:
    """Restrict the CPU kernels to `isa` ("avx512", "avx2", "scalar"); "best" restores the default.
    A wider ISA than this build or CPU supports raises RuntimeError."""
    torch.ops.sqz_kernels.set_cpu_isa(isa)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@torch.library.register_fake("sqz_kernels::fused_fire")
def _fused_fire_fake(x, w_sq, b_sq, w_e1, b_e1, w_e3, b_e3):
    torch._check(x.dim() == 4, lambda: "fused_fire: x must be 4-D [N, C, H, W]")
    n, _, h, w = x.shape
    out = x.new_empty((n, w_e1.shape[0] + w_e3.shape[0], h, w))
    return out.contiguous(memory_format=_memory_format(x))


def _setup_context(ctx, inputs, output):
    x, w_sq, b_sq, w_e1, b_e1, w_e3, b_e3 = inputs
    ctx.has_bias = (b_sq is not None, b_e1 is not None, b_e3 is not None)
    # the ReLU mask, not the output: a bypass (out += x) changes the output in place
    ctx.save_for_backward(x, w_sq, b_sq, w_e1, b_e1, w_e3, output > 0)


def _backward(ctx, grad_out):
    # The backward recomputes the squeeze activation with ATen ops (it is not kept by the fused
    # forward) and then follows the chain rule of the eager Fire exactly, computing only the
    # gradients that are needed.
    x, w_sq, b_sq, w_e1, b_e1, w_e3, out_pos = ctx.saved_tensors
    need = ctx.needs_input_grad  # x, w_sq, b_sq, w_e1, b_e1, w_e3, b_e3
    e1 = w_e1.shape[0]
    nn_grad = torch.nn.grad
    s = F.relu(F.conv2d(x, w_sq, b_sq))
    g = grad_out * out_pos.to(grad_out.dtype)
    g1, g3 = g[:, :e1], g[:, e1:]
    gw_e1 = nn_grad.conv2d_weight(s, w_e1.shape, g1) if need[3] else None
    gw_e3 = nn_grad.conv2d_weight(s, w_e3.shape, g3, padding=1) if need[5] else None
    gb_e1 = g1.sum((0, 2, 3)) if need[4] and ctx.has_bias[1] else None
    gb_e3 = g3.sum((0, 2, 3)) if need[6] and ctx.has_bias[2] else None
    gx = gw_sq = gb_sq = None
    if need[0] or need[1] or need[2]:
        gs = nn_grad.conv2d_input(s.shape, w_e1, g1) + nn_grad.conv2d_input(s.shape, w_e3, g3, padding=1)
        gs = gs * (s > 0).to(gs.dtype)
        gx = nn_grad.conv2d_input(x.shape, w_sq, gs) if need[0] else None
        gw_sq = nn_grad.conv2d_weight(x, w_sq.shape, gs) if need[1] else None
        gb_sq = gs.sum((0, 2, 3)) if need[2] and ctx.has_bias[0] else None
    return gx, gw_sq, gb_sq, gw_e1, gb_e1, gw_e3, gb_e3


torch.library.register_autograd("sqz_kernels::fused_fire", autocast_off(_backward),
                                setup_context=_setup_context)


def _int_pair(v, name: str) -> Tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) == 1:
        t = (t[0], t[0])
    if len(t) != 2 or not all(isinstance(a, int) for a in t):
        raise ValueError(f"max_pool2d: {name} must be an int or a pair of ints, got {v!r}")
    return t  # type: ignore[return-value]


def max_pool2d(x: Tensor, kernel_size: Union[int, Sequence[int]],
               stride: Optional[Union[int, Sequence[int]]] = None,
               padding: Union[int, Sequence[int]] = 0, ceil_mode: bool = False) -> Tensor:
    """F.max_pool2d with dilation 1 and no indices, by sqz's CPU kernel (4-D float32/float64 x;
    stride None or [] = kernel_size, like torch). The output has x's memory format. Differentiable
    (the backward uses ATen's max_pool2d_with_indices_backward, so gradients equal torch's)."""
    k = _int_pair(kernel_size, "kernel_size")
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _int_pair(stride, "stride")
    p = _int_pair(padding, "padding")
    return call_op(torch.ops.sqz_kernels.max_pool2d, (x, list(k), list(s), list(p), bool(ceil_mode)), (x,))


def _pooled_size(n, k, s, p, ceil_mode):
    out = (n + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    return out - 1 if ceil_mode and (out - 1) * s >= n + p else out


@torch.library.register_fake("sqz_kernels::max_pool2d")
def _max_pool2d_fake(x, kernel_size, stride, padding, ceil_mode):
    torch._check(x.dim() == 4, lambda: "max_pool2d: x must be 4-D [N, C, H, W]")
    n, c, h, w = x.shape
    ho = _pooled_size(h, kernel_size[0], stride[0], padding[0], ceil_mode)
    wo = _pooled_size(w, kernel_size[1], stride[1], padding[1], ceil_mode)
    return x.new_empty((n, c, ho, wo)).contiguous(memory_format=_memory_format(x))


def _max_pool2d_setup(ctx, inputs, output):
    x, kernel_size, stride, padding, ceil_mode = inputs
    ctx.pool = (kernel_size, stride, padding, ceil_mode)
    ctx.save_for_backward(x)


def _max_pool_input_grad(grad_out, x, k, s, p, ceil_mode):
    """dL/dx of max_pool2d(x) (dilation 1) from ATen's indices (first maximum of each window) and
    its backward: torch's gradient exactly. Also the pool part of the fused conv / Fire + pool ops."""
    _, idx = torch.ops.aten.max_pool2d_with_indices(x, k, s, p, [1, 1], ceil_mode)
    return torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, k, s, p, [1, 1], ceil_mode, idx)


def _max_pool2d_backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return (_max_pool_input_grad(grad_out, x, *ctx.pool), None, None, None, None)


torch.library.register_autograd("sqz_kernels::max_pool2d", autocast_off(_max_pool2d_backward),
                                setup_context=_max_pool2d_setup)


# The sparse-codebook ops (Deep Compression weights executed directly) live in their own file.
from .codebook_ops import *  # noqa: E402,F401,F403
from .codebook_ops import __all__ as _codebook_all  # noqa: E402

__all__ += _codebook_all
