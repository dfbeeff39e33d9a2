"""Modules whose state IS the compressed weight: CodebookConv2d, CodebookLinear, CodebookFire.

State per layer (see compression/resident.py for the format): `codebook` (Parameter, so the
shared centroids can be fine-tuned), `codes`, `gaps`, `row_counts` (uint8/uint8/int32 buffers)
and `bias`. No dense float weight is ever stored. `forward` runs the sparse-codebook kernels
(sqz_kernels/codebook_ops.py), which execute exactly these tensors; `forward_reference` (decode,
then the ATen op) is the test oracle and the path for devices/dtypes the kernels do not cover
(the kernels are CPU float32/float64).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import codebook_ops, ops
from .codebook_ops import _pair
from ._modules import has_hooks, module_paths
from .compression import resident
from .compression.kmeans import kmeans_1d

__all__ = ["CodebookConv2d", "CodebookLinear", "CodebookFire", "fold_relu_", "fold_pool_"]

_STREAMS = ("codes", "gaps", "row_counts")


class _CodebookLayer(nn.Module):
    """Shared state handling of CodebookConv2d / CodebookLinear."""

    weight_shape: Tuple[int, ...]

    def _init_state(self, out_rows: int, bits: int, bias: bool) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
        self.bits = bits
        self.relu = False  # a fused ReLU on the output (set by fold_relu_; not part of the state)
        # An empty layer (no entries) until set_compressed: an all-zero weight.
        self.codebook = nn.Parameter(torch.zeros(1))
        self.register_buffer("codes", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("gaps", torch.zeros(0, dtype=torch.uint8))
        self.register_buffer("row_counts", torch.zeros(out_rows, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_rows)) if bias else None

    def set_compressed(self, codebook: Tensor, codes: Tensor, gaps: Tensor, row_counts: Tensor,
                       bias: Optional[Tensor] = None) -> None:
        """Install new streams (validated first; nothing changes if they are invalid)."""
        resident.validate(codebook.detach(), codes, gaps, row_counts, self.weight_shape, self.bits)
        dev = self.codebook.device
        with torch.no_grad():
            self.codebook = nn.Parameter(codebook.detach().to(dev, torch.float32).clone(),
                                         requires_grad=self.codebook.requires_grad)
        self.codes, self.gaps, self.row_counts = codes.to(dev), gaps.to(dev), row_counts.to(dev)
        if bias is not None:
            if self.bias is None or bias.shape != self.bias.shape:
                raise ValueError(f"bias must have shape {[self.weight_shape[0]]} on a layer with bias")
            with torch.no_grad():
                self.bias.copy_(bias)

    def compress_weight_(self, weight: Tensor, mask: Optional[Tensor] = None, init: str = "linear",
                         iters: int = 300) -> None:
        """Quantize a dense `weight` (entries where `mask`, default: weight != 0) with per-layer
        k-means at self.bits and install the result."""
        if tuple(weight.shape) != tuple(self.weight_shape):
            raise ValueError(f"weight has shape {list(weight.shape)}, expected {list(self.weight_shape)}")
        o = self.weight_shape[0]
        w2 = weight.detach().reshape(o, -1).cpu()
        m2 = (w2 != 0) if mask is None else mask.reshape(o, -1).cpu().bool()
        cb, codes = kmeans_1d(w2[m2], self.bits, init=init, iters=iters)
        c, g, rc = resident.encode_rows(m2, codes)
        self.set_compressed(cb, c, g, rc)

    def decoded_weight(self) -> Tensor:
        """The dense weight the streams describe (reference decoder; differentiable w.r.t. the
        codebook, so centroids receive the grouped gradient)."""
        return resident.decode_dense(self.codebook, self.codes, self.gaps, self.row_counts,
                                     self.weight_shape, self.bits)

    @property
    def nnz(self) -> int:
        return int((self.gaps != resident.FILLER).sum())

    def resident_bytes(self) -> int:
        return resident.resident_nbytes(self.codebook, self.codes, self.row_counts, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # The stream lengths vary with the weight: adopt the incoming sizes, then validate.
        new = {}
        for name in ("codebook",) + _STREAMS:
            key = prefix + name
            if key in state_dict:
                new[name] = state_dict[key]
        if len(new) == 4:
            try:
                resident.validate(new["codebook"].detach().float(), new["codes"], new["gaps"],
                                  new["row_counts"], self.weight_shape, self.bits)
            except ValueError as e:
                errors.append(f"{prefix}: invalid compressed state: {e}")
                return
            with torch.no_grad():
                self.codebook = nn.Parameter(torch.empty_like(new["codebook"], dtype=torch.float32,
                                                              device=self.codebook.device),
                                             requires_grad=self.codebook.requires_grad)
            for name in _STREAMS:
                setattr(self, name, torch.empty_like(new[name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def _take_over(self, dense: nn.Module, mask, init: str, iters: int):
        """Become the compressed version of a dense Conv2d/Linear: its device, weight (k-means
        over the entries in `mask`), bias and training mode."""
        self.to(dense.weight.device)
        self.compress_weight_(dense.weight, mask, init, iters)
        if dense.bias is not None:
            with torch.no_grad():
                self.bias.copy_(dense.bias)
            self.bias.requires_grad_(dense.bias.requires_grad)
        # a frozen layer stays frozen: fine-tuning must not move its centroids
        self.codebook.requires_grad_(dense.weight.requires_grad)
        self.train(dense.training)
        return self

    def _kernel_state(self, x: Tensor):
        """(codebook, codes, gaps, row_counts, bias) in x's dtype, as the kernels take them.
        (Per-call Python cost matters at batch 1: attributes are read once, no no-op .to().)"""
        d = self.__dict__
        params, buffers = d["_parameters"], d["_buffers"]
        cb, b = params["codebook"], params.get("bias")
        dt = x.dtype
        if cb.dtype != dt:
            cb = cb.to(dt)
        if b is not None and b.dtype != dt:
            b = b.to(dt)
        return cb, buffers["codes"], buffers["gaps"], buffers["row_counts"], b


_KERNEL_DTYPES = (torch.float32, torch.float64)


def _kernels_cover(x: Tensor, module: nn.Module) -> bool:
    # x.is_cpu, not x.device.type == "cpu": the latter builds a torch.device (~0.8 us). Under
    # forward-mode AD (a tangent on x or a parameter of `module`) the reference path, which has a
    # jvp; the parameters are looked at only while a forward-AD level is open (~1-2 us a call).
    return x.is_cpu and x.dtype in _KERNEL_DTYPES and not (
        ops.fwad_open() and ops.has_tangent(x, *module.parameters()))


class CodebookConv2d(_CodebookLayer):
    """A Conv2d (groups 1, dilation 1, zero padding) whose weight is held compressed."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, bits: int = 8):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.weight_shape = (self.out_channels, self.in_channels) + self.kernel_size
        self._geometry = (list(self.kernel_size), list(self.stride), list(self.padding))
        self._init_state(self.out_channels, bits, bias)
        # A max-pool on the output, ([kh, kw], [sh, sw], ceil_mode) with padding 0, or None (set by
        # fold_pool_; like `relu`, not part of the state).
        self.pool: Optional[Tuple[list, list, bool]] = None
        # A global average pool on the output (AdaptiveAvgPool2d(1), set by fold_pool_): the output
        # is [N, O, 1, 1] and the conv output is never written (codebook_conv2d_global_avg_pool).
        self.global_pool = False

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bits: int = 8, mask: Optional[Tensor] = None,
                  init: str = "linear", iters: int = 300) -> "CodebookConv2d":
        """Compress a Conv2d: entries where `mask` (default: weight != 0), k-means at `bits`."""
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"from_conv: expected nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" \
                or isinstance(conv.padding, str):
            raise ValueError("from_conv: only groups=1, dilation=1, numeric zero padding are supported")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                bias=conv.bias is not None, bits=bits)
        return m._take_over(conv, mask, init, iters)

    def forward_reference(self, x: Tensor) -> Tensor:
        w = self.decoded_weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        y = F.conv2d(x, w, b, self.stride, self.padding)
        y = F.relu(y) if self.relu else y
        if self.pool is not None:
            y = F.max_pool2d(y, self.pool[0], self.pool[1], 0, ceil_mode=self.pool[2])
        if self.global_pool:
            y = F.adaptive_avg_pool2d(y, 1)
        return y

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # unbatched [C, H, W], as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if not _kernels_cover(x, self):
            return self.forward_reference(x)
        # The op's streams fit any input with at least the channels they address, so the layer
        # checks its own (as nn.Conv2d does); a wider input would run with zero weights.
        if x.dim() == 4 and x.shape[1] != self.in_channels:
            raise RuntimeError(f"CodebookConv2d: expected input with {self.in_channels} channels, "
                               f"got shape {tuple(x.shape)}")
        # the op directly (geometry validated once in __init__, not per call by the wrapper)
        state = self._kernel_state(x)
        geom = (x, *state, self._geometry[0], self._geometry[1], self._geometry[2], self.relu)
        # the op handles codebook_ops looked up once (torch.ops.<ns>.<op> is ~0.6 us a call)
        if self.global_pool:
            return ops.call_op(codebook_ops._CONV2D_MEAN, geom, (x, state[0], state[4]))
        if self.pool is not None:
            return ops.call_op(codebook_ops._CONV2D_MAX_POOL, geom + tuple(self.pool),
                               (x, state[0], state[4]))
        return ops.call_op(codebook_ops._CONV2D, geom, (x, state[0], state[4]))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bits={self.bits}, "
                f"n={self.codebook.numel()}, entries={self.codes.numel()}"
                + (", relu=True" if self.relu else "")
                + (f", pool={self.pool}" if self.pool is not None else "")
                + (", global_pool=True" if self.global_pool else ""))


class CodebookLinear(_CodebookLayer):
    """A Linear whose weight is held compressed (rows = output features, K = in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 5):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight_shape = (self.out_features, self.in_features)
        self._init_state(self.out_features, bits, bias)

    @classmethod
    def from_linear(cls, lin: nn.Linear, bits: int = 5, mask: Optional[Tensor] = None,
                    init: str = "linear", iters: int = 300) -> "CodebookLinear":
        """Compress a Linear: entries where `mask` (default: weight != 0), k-means at `bits`."""
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"from_linear: expected nn.Linear, got {type(lin).__name__}")
        m = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, bits=bits)
        return m._take_over(lin, mask, init, iters)

    def forward_reference(self, x: Tensor) -> Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.decoded_weight().to(x.dtype), b)
        return F.relu(y) if self.relu else y

    def forward(self, x: Tensor) -> Tensor:
        if not _kernels_cover(x, self):
            return self.forward_reference(x)
        if x.dim() >= 1 and x.shape[-1] != self.in_features:  # see CodebookConv2d.forward
            raise RuntimeError(f"CodebookLinear: expected input with {self.in_features} features, "
                               f"got shape {tuple(x.shape)}")
        return codebook_ops.codebook_linear(x, *self._kernel_state(x), relu=self.relu)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"n={self.codebook.numel()}, entries={self.codes.numel()}"
                + (", relu=True" if self.relu else ""))


class CodebookFire(nn.Module):
    """Fire module whose three convs are CodebookConv2d, with torchvision's child names."""

    def __init__(self, inplanes: int, squeeze_planes: int, expand1x1_planes: int,
                 expand3x3_planes: int, bits: int = 8):
        super().__init__()
        self.inplanes = inplanes
        self.squeeze = CodebookConv2d(inplanes, squeeze_planes, 1, bits=bits)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = CodebookConv2d(squeeze_planes, expand1x1_planes, 1, bits=bits)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = CodebookConv2d(squeeze_planes, expand3x3_planes, 3, padding=1, bits=bits)
        self.expand3x3_activation = nn.ReLU(inplace=True)
        self.pool: Optional[Tuple[list, list, bool]] = None  # a folded max-pool (see fold_pool_)

    @classmethod
    def from_codebook_convs(cls, squeeze: CodebookConv2d, expand1x1: CodebookConv2d,
                            expand3x3: CodebookConv2d) -> "CodebookFire":
        """Assemble from three existing CodebookConv2d (shared, not copied); checks Fire geometry."""
        ok = (all(isinstance(c, CodebookConv2d) for c in (squeeze, expand1x1, expand3x3))
              and squeeze.kernel_size == (1, 1) and expand1x1.kernel_size == (1, 1)
              and expand3x3.kernel_size == (3, 3) and expand3x3.padding == (1, 1)
              and squeeze.padding == (0, 0) and expand1x1.padding == (0, 0)
              and all(c.stride == (1, 1) for c in (squeeze, expand1x1, expand3x3))
              and expand1x1.in_channels == squeeze.out_channels == expand3x3.in_channels)
        if not ok:
            raise ValueError("from_codebook_convs: convs do not form a Fire module "
                             "(squeeze 1x1, expand1x1 1x1, expand3x3 3x3 pad 1, stride 1)")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.inplanes = squeeze.in_channels
        new.squeeze, new.expand1x1, new.expand3x3 = squeeze, expand1x1, expand3x3
        new.squeeze_activation = nn.ReLU(inplace=True)
        new.expand1x1_activation = nn.ReLU(inplace=True)
        new.pool = None
        new.expand3x3_activation = nn.ReLU(inplace=True)
        new.train(squeeze.training)
        return new

    def forward_reference(self, x: Tensor) -> Tensor:
        s = F.relu(self.squeeze.forward_reference(x))
        y = torch.cat([F.relu(self.expand1x1.forward_reference(s)),
                       F.relu(self.expand3x3.forward_reference(s))], 1)
        if self.pool is not None:
            y = F.max_pool2d(y, self.pool[0], self.pool[1], 0, ceil_mode=self.pool[2])
        return y

    def forward(self, x: Tensor) -> Tensor:
        if not _kernels_cover(x, self):
            return self.forward_reference(x)
        if x.dim() == 4 and x.shape[1] != self.squeeze.in_channels:  # see CodebookConv2d.forward
            raise RuntimeError(f"CodebookFire: expected input with {self.squeeze.in_channels} "
                               f"channels, got shape {tuple(x.shape)}")
        state = (*self.squeeze._kernel_state(x), *self.expand1x1._kernel_state(x),
                 *self.expand3x3._kernel_state(x))
        if self.pool is not None:
            return codebook_ops.codebook_fused_fire_max_pool(x, *state, *self.pool)
        return codebook_ops.codebook_fused_fire(x, *state)

    def extra_repr(self) -> str:
        return f"pool={self.pool}" if self.pool is not None else ""


def fold_relu_(model: nn.Module) -> int:
    """In every nn.Sequential of `model`, a CodebookConv2d / CodebookLinear directly followed by an
    nn.ReLU takes the ReLU into its kernel (the layer's `relu` flag; the ReLU becomes nn.Identity,
    so module names and the state_dict are unchanged). Saves a pass over the output (SqueezeNet:
    conv1 and the classifier conv). A layer used in more than one place is left as it is (the
    flag would apply at every use); a forward that keeps the layer's own output (before the ReLU)
    would see it after. Returns the number of folds."""
    folds = 0
    shared = _shared_modules(model)
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            layer, act = seq._modules[a], seq._modules[b]
            if isinstance(layer, (CodebookConv2d, CodebookLinear)) and not layer.relu \
                    and type(act) is nn.ReLU and id(layer) not in shared \
                    and not has_hooks(layer) and not has_hooks(act):
                layer.relu = True
                seq._modules[b] = _identity_like(act)
                folds += 1
    return folds


def _shared_modules(model: nn.Module) -> set:
    """ids of the modules reachable by more than one path of `model` (used in several places)."""
    return {i for i, paths in module_paths(model).items() if len(paths) > 1}


def _identity_like(folded: nn.Module) -> nn.Module:
    """The nn.Identity that takes a folded module's place, in its training mode (a fresh module is
    in training mode: inside an eval model it would change the modes KernelChain's guard checks)."""
    return nn.Identity().train(folded.training)


def _poolable(pool: nn.Module) -> Optional[Tuple[list, list, bool]]:
    """(kernel, stride, ceil_mode) of a plain max-pool the fused kernel computes, else None."""
    if not isinstance(pool, nn.MaxPool2d) or pool.return_indices:
        return None
    k = list(_pair(pool.kernel_size, "kernel_size"))
    st = k if pool.stride is None else list(_pair(pool.stride, "stride"))
    if _pair(pool.padding, "padding") != (0, 0) or _pair(pool.dilation, "dilation") != (1, 1):
        return None
    return (k, st, bool(pool.ceil_mode))


def _global_avg_pool(pool: nn.Module) -> bool:
    """Whether `pool` averages each channel to one pixel (AdaptiveAvgPool2d(1) / ((1, 1)))."""
    if not isinstance(pool, nn.AdaptiveAvgPool2d):
        return False
    size = pool.output_size
    return size == 1 or (isinstance(size, (tuple, list)) and tuple(size) == (1, 1))


def fold_pool_(model: nn.Module) -> int:
    """In every nn.Sequential of `model`, a CodebookConv2d or CodebookFire followed by an
    nn.MaxPool2d (padding 0, dilation 1, no indices; sk.MaxPool2d too) takes the pool into its
    kernel (codebook_conv2d_max_pool / codebook_fused_fire_max_pool: the output is pooled band by
    band and never written whole), and a CodebookConv2d followed by nn.AdaptiveAvgPool2d(1) takes
    the global average pool (codebook_conv2d_global_avg_pool: each output tile is summed, never
    stored). nn.Identity may sit between them, and for a conv also nn.ReLU, which is folded too
    (see fold_relu_). The folded modules become nn.Identity, so module names and the state_dict
    are unchanged. SqueezeNet: every max-pool (after conv1 and after two Fires) and the
    classifier's average pool. As in fold_relu_, a layer used in more than one place is left as
    it is. Returns the number of pools folded."""
    folds = 0
    shared = _shared_modules(model)
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for i, a in enumerate(names):
            layer = seq._modules[a]
            if not isinstance(layer, (CodebookConv2d, CodebookFire)) or layer.pool is not None \
                    or getattr(layer, "global_pool", False) or id(layer) in shared \
                    or has_hooks(layer):
                continue
            j, relus = i + 1, []
            while j < len(names) and type(seq._modules[names[j]]) in (nn.ReLU, nn.Identity):
                if type(seq._modules[names[j]]) is nn.ReLU:
                    relus.append(names[j])
                j += 1
            nxt = seq._modules[names[j]] if j < len(names) else None
            spec = _poolable(nxt) if nxt is not None else None
            mean = isinstance(layer, CodebookConv2d) and nxt is not None and _global_avg_pool(nxt)
            if spec is None and not mean:
                continue
            if any(has_hooks(seq._modules[names[k]]) for k in range(i + 1, j + 1)):
                continue  # a hook on the pool or a ReLU between would be lost with it
            if relus and isinstance(layer, CodebookFire):
                continue  # a Fire's output is already >= 0, but keep unusual graphs as they are
            for r in relus:  # ReLU is idempotent: any number of them folds into the flag
                layer.relu = True
                seq._modules[r] = _identity_like(seq._modules[r])
            if mean:
                layer.global_pool = True
            else:
                layer.pool = spec
            seq._modules[names[j]] = _identity_like(nxt)
            folds += 1
    return folds
