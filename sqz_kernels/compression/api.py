"""compress(): Deep Compression of a model in place, and the helpers around it."""
import fnmatch
import math
import os
from typing import Callable, Dict, List, Optional, Tuple, Union

from torch import nn

from .._modules import has_hooks, replace_everywhere
from . import container, prune as _prune
from .finetune import run_finetune
from .kmeans import INITS
from .report import CompressionReport, LayerReport

__all__ = ["PRESETS", "compress", "report", "file_report", "resident_bytes", "compressible_layers"]

# density / bits; None bits = the paper's per-kind default (conv 8, linear 5)
PRESETS = {
    "squeezenet": {"density": 0.33, "bits": 6},   # SqueezeNet paper: 6-bit, 33 % -> 0.47 MB
    "paper": {"density": 1.0, "bits": None},      # Deep Compression's quantization defaults
}
DEFAULT_BITS = {"conv2d": 8, "linear": 5}


def _supported_conv(m: nn.Conv2d) -> bool:
    return (m.groups == 1 and tuple(m.dilation) == (1, 1) and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


# Modules whose forward reads their Linear children's .weight / .bias directly (attention's
# projections, the encoder / decoder layers' fast paths) instead of calling them
_READS_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _unsupported(name: str, m: nn.Module, parents: Dict[str, nn.Module]) -> Optional[str]:
    """Why the Conv2d / Linear `m` cannot become a Codebook layer, or None."""
    if type(m).forward not in (nn.Conv2d.forward, nn.Linear.forward):
        return f"{type(m).__name__} has its own forward"
    parent = parents.get(name.rpartition(".")[0])
    if isinstance(parent, _READS_WEIGHTS):
        return f"read by {type(parent).__name__} through its .weight"
    if has_hooks(m):
        return "has forward / backward hooks (a new module would drop them)"
    if isinstance(m, nn.Conv2d) and not _supported_conv(m):
        return "groups / dilation / padding mode / string padding not supported"
    return None


def compressible_layers(model: nn.Module, filter_fn=None) -> Tuple[Dict[str, nn.Module], List[str], List[str]]:
    """(layers: name -> Conv2d/Linear to compress, fire names, skipped names). A plain Fire
    (sqz_kernels.fire.is_plain_fire) is compressed whole or not at all: if filter_fn vetoes one
    of its convs, all three stay dense. Skipped: convs the kernels do not run, subclasses with
    their own forward, layers with hooks, and the Linear children of nn.MultiheadAttention and
    the transformer layers (they read their .weight directly)."""
    return _compressible(model, filter_fn)[:3]


def _compressible(model: nn.Module, filter_fn):
    """compressible_layers, plus {skipped name: why}."""
    from ..fire import is_fire_like, is_plain_fire
    if is_fire_like(model):
        raise ValueError("compress: the model is itself a Fire module; wrap it (e.g. nn.Sequential(fire)) "
                         "so that it can be replaced by a CodebookFire")
    fires, layers, skipped = [], {}, []
    why: Dict[str, str] = {}
    in_fire = set()
    parents = dict(model.named_modules())
    for name, m in model.named_modules():
        if m is not model and is_plain_fire(m) and not any(name.startswith(f + ".") for f in fires):
            kids = [f"{name}.{c}" for c in ("squeeze", "expand1x1", "expand3x3")]
            if filter_fn is None or all(filter_fn(k, model.get_submodule(k)) for k in kids):
                fires.append(name)
            in_fire.update(kids)
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or m is model:
            continue
        if name in in_fire:
            if name.rpartition(".")[0] in fires:
                layers[name] = m
            continue
        reason = _unsupported(name, m, parents)
        if reason is not None:
            skipped.append(name)
            why[name] = reason
            continue
        if filter_fn is None or filter_fn(name, m):
            layers[name] = m
    return layers, fires, skipped, why


def _per_layer(value, layers: Dict[str, nn.Module], default: Callable[[str, nn.Module], object],
               argname: str, check: Callable[[object, str], object]) -> Dict[str, object]:
    """One value for all layers, or a dict {name or fnmatch pattern: value}; unmatched layers
    take `default`. A key that matches no layer is an error (it is almost always a typo)."""
    if isinstance(value, dict):
        out = {}
        for key in value:
            if not isinstance(key, str) or not any(fnmatch.fnmatchcase(n, key) for n in layers):
                raise ValueError(f"{argname}: key {key!r} matches no compressible layer "
                                 f"(layers: {list(layers)[:6]}...)")
        for n, m in layers.items():
            hits = [k for k in value if fnmatch.fnmatchcase(n, k)]
            v = value[n] if n in value else (value[hits[0]] if hits else default(n, m))
            out[n] = check(v, f"{argname}[{n!r}]")
        return out
    return {n: check(default(n, m) if value is None else value, argname) for n, m in layers.items()}


def _check_bits(v, what):
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 8:
        raise ValueError(f"{what} must be an int in [1, 8], got {v!r}")
    return v


def _kind(m):
    return "linear" if isinstance(m, nn.Linear) else "conv2d"


def compress(model: nn.Module, density=None, bits=None, finetune=None, *, preset: Optional[str] = None,
             init: str = "linear", prune_schedule=None, prune_finetune=None, block: int = 1,
             filter_fn: Optional[Callable[[str, nn.Module], bool]] = None, index_bits: Union[int, str] = "auto",
             codebook_dtype: str = "float32", kmeans_iters: int = 300,
             progress: bool = True) -> CompressionReport:
    """Deep Compression of `model`, in place: prune -> (retrain) -> k-means share -> fine-tune.

    density: fraction of weights kept, a number in (0, 1] or {layer name / pattern: value};
        default 1.0 (no pruning) or the preset's.
    bits: codebook bits in [1, 8], a number or dict; default conv 8 / linear 5 (the paper).
    finetune: after quantization: None, a callable train_step(model) (runs the whole
        fine-tuning; its optimizer must be built inside, the parameters are new), a FineTune or a
        dict of FineTune fields (dataloader, loss_fn, steps, lr).
    preset: 'squeezenet' (33 %, 6 bit) or 'paper'; explicit density/bits override it.
    init: k-means centroid initialisation, 'linear' (default), 'density' or 'random'.
    prune_schedule: None (one shot), an int number of steps, or a decreasing list of densities;
        prune_finetune (same forms as finetune) retrains after each step with masks held.
    block: 1 = unstructured pruning (the paper's); 4 prunes blocks of 4 consecutive output
        channels at one input position together, which the codebook kernels run as row quads
        (one input load per four multiply-adds: faster at equal density, pruning less freely).
    kmeans_iters: the most Lloyd iterations per layer.
    filter_fn(name, module) -> bool may keep a layer dense. index_bits / codebook_dtype: the
        storage settings the report assumes (pass the same to save()).
    Conv2d -> CodebookConv2d, Linear -> CodebookLinear, Fire-like -> CodebookFire."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    container._check_index_bits(index_bits)
    if codebook_dtype not in container._DTYPES:
        raise ValueError(f"codebook_dtype must be one of {list(container._DTYPES)}, got {codebook_dtype!r}")
    p = PRESETS.get(preset, {})
    density = p.get("density") if density is None else density
    bits = p.get("bits") if bits is None else bits
    layers, fires, skipped, why = _compressible(model, filter_fn)
    if not layers:
        detail = "; ".join(f"{n}: {why[n]}" for n in skipped[:8]) if skipped else ""
        raise ValueError("compress: the model has no Conv2d / Linear layer to compress"
                         + (f" (skipped: {detail})" if detail else ""))
    dens = _per_layer(density, layers, lambda n, m: 1.0, "density", _prune._check_density)
    nbits = _per_layer(bits, layers, lambda n, m: DEFAULT_BITS[_kind(m)], "bits", _check_bits)

    # 1. prune (masks stay in force during retraining)
    train = None
    if prune_finetune is not None:
        train = lambda m: run_finetune(prune_finetune, m, "prune_finetune")  # noqa: E731
    masks = _prune.prune_(layers, dens, prune_schedule, train, model, block)

    # 2. share weights: per-layer k-means over the surviving weights, then swap modules
    from tqdm.auto import tqdm
    from ..codebook import CodebookConv2d, CodebookFire, CodebookLinear
    new = {}
    for name, m in tqdm(layers.items(), desc="k-means", disable=not progress, leave=False):
        if isinstance(m, nn.Linear):
            new[name] = CodebookLinear.from_linear(m, nbits[name], masks[name], init, kmeans_iters)
        else:
            new[name] = CodebookConv2d.from_conv(m, nbits[name], masks[name], init, kmeans_iters)
    replace_everywhere(model, new)
    new_fires = {}
    for f in fires:
        convs = [model.get_submodule(f"{f}.{c}") for c in ("squeeze", "expand1x1", "expand3x3")]
        new_fires[f] = CodebookFire.from_codebook_convs(*convs).train(model.get_submodule(f).training)
    replace_everywhere(model, new_fires)

    # 3. fine-tune the shared centroids (grouped gradient via the codebook gather)
    run_finetune(finetune, model, "finetune")
    r = report(model, index_bits=index_bits, codebook_dtype=codebook_dtype)
    r.skipped = skipped
    return r


def report(model: nn.Module, index_bits: Union[int, str] = "auto", codebook_dtype: str = "float32",
           chunk: int = container.DEFAULT_CHUNK) -> CompressionReport:
    """The report of an already compressed model, for the given storage settings (it encodes
    the Huffman streams to measure them; nothing is written)."""
    layers, _ = container._codebook_layers(model)
    cb_size = container._DTYPES[codebook_dtype].itemsize
    out, owned = [], set()
    for name, m in layers:
        p = container.pack_layer(m, index_bits, chunk)
        out.append(LayerReport(
            name=name, kind="linear" if not hasattr(m, "kernel_size") else "conv2d",
            shape=list(m.weight_shape), params=math.prod(m.weight_shape), nnz=p["nnz"], bits=m.bits,
            n=int(m.codebook.numel()), index_bits=p["index_bits"], index_symbols=p["gaps"][2],
            index_bytes=len(p["gaps"][0]), codes_bytes=len(p["codes"][0]),
            codebook_bytes=int(m.codebook.numel()) * cb_size,
            # the bias is a dense leftover, counted once in other_bytes
            resident_bytes=m.resident_bytes() - (0 if m.bias is None else m.bias.numel() * m.bias.element_size())))
        pre = name + "." if name else ""
        owned.update(pre + s for s in ("codebook", "codes", "gaps", "row_counts"))
    other = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k not in owned)
    return CompressionReport(out, other, codebook_dtype)


def file_report(path: Union[str, os.PathLike]) -> CompressionReport:
    """The report of a .sqz file from its metadata alone (no stream is decoded)."""
    with open(path, "rb") as f:
        data = f.read()
    header = container._header(data)
    meta = container._check_meta(header)
    cb_size = container._DTYPES[meta["codebook_dtype"]].itemsize
    out = []
    for L in meta["layers"]:
        out.append(LayerReport(
            name=L["name"], kind=L["kind"], shape=L["shape"], params=math.prod(L["shape"]),
            nnz=L["nnz"], bits=L["bits"], n=L["n"], index_bits=L["index_bits"],
            index_symbols=L["gaps"]["nsym"], index_bytes=L["gaps"]["len"],
            codes_bytes=L["codes"]["len"], codebook_bytes=L["n"] * cb_size))
    other = 0
    for k, v in header.items():
        if k in ("__metadata__", container.STREAMS, container.CODEBOOKS) or not isinstance(v, dict):
            continue
        off = v.get("data_offsets")
        if not (isinstance(off, list) and len(off) == 2 and all(
                isinstance(a, int) and not isinstance(a, bool) for a in off) and 0 <= off[0] <= off[1]):
            container._fail(f"tensor {k!r}: data_offsets must be two ints 0 <= begin <= end, got {off!r}")
        other += off[1] - off[0]
    return CompressionReport(out, other, meta["codebook_dtype"], file_bytes=len(data))


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the compressed layers' resident state (2 per entry + codebooks + row_counts +
    biases) plus every other parameter/buffer of the model."""
    layers, _ = container._codebook_layers(model)
    owned = set()
    total = 0
    for name, m in layers:
        total += m.resident_bytes()
        pre = name + "." if name else ""
        owned.update(pre + s for s in ("codebook", "codes", "gaps", "row_counts", "bias"))
    return total + sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k not in owned)
