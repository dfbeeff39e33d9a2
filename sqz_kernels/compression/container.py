"""The .sqz file: Deep Compression's storage format inside a safetensors container. No pickle.

Per compressed layer the weight is a sparse matrix over the flattened weight (all O*K positions
in row-major order), stored as two Huffman-coded streams:
  gaps   relative index of each non-zero with `index_bits` bits per symbol; symbol F =
         2**index_bits - 1 is a filler (cursor += F, no weight) so longer gaps need no wider
         index; cursor starts at -1 and a symbol s < F means cursor += s + 1.
  codes  the codebook index of each non-zero (fillers carry no code in the file).
Codebooks (fp32 or fp16) of all layers are one tensor; all Huffman blobs are one uint8 tensor;
every other parameter/buffer of the model (biases, ...) is stored as is, under its state_dict
name. The safetensors metadata key "sqz" holds JSON: format, version, chunk, codebook dtype, the
layer list (name, kind, shape, stride/padding, bits, n, nnz, index_bits, stream offsets, sizes,
Huffman tables as one hex digit (code length) per symbol, CRC32), Fire modules, and a CRC32 of
every other tensor. The loader checks all of it before it touches the model.
"""
import json
import os
import struct
import zlib
from typing import Dict, List, Union

import numpy as np
import torch
from torch import Tensor, nn

from .._modules import replace_submodule
from . import huffman, resident

__all__ = ["FORMAT", "VERSION", "save", "load", "read", "read_metadata", "pack_layer",
           "gap_symbols", "best_index_bits"]

FORMAT = "sqz_kernels.deep_compression"
VERSION = 1
STREAMS = "__sqz_streams__"
CODEBOOKS = "__sqz_codebooks__"
MAX_HEADER = 64 << 20        # a safetensors header larger than this is refused
MAX_ROWS = 1 << 24           # all layers together: bounds the row_counts allocations (64 MiB),
                             # which a layer without entries costs but its file bytes do not
MAX_NUMEL = 1 << 34          # per layer: positions must fit comfortably in int64 arithmetic
DEFAULT_CHUNK = 2048
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# ----------------------------------------------------------------------------------- packing --
def gap_symbols(flat_pos: Tensor, index_bits: int) -> Tensor:
    """Gap stream (uint8) for sorted flat positions with filler symbol 2**index_bits - 1."""
    f = (1 << index_bits) - 1
    _, gaps, _ = resident.encode_positions(torch.zeros_like(flat_pos), flat_pos,
                                           torch.zeros_like(flat_pos), 1, filler=f)
    return gaps


def _gap_freqs(flat_pos: np.ndarray, index_bits: int) -> np.ndarray:
    f = (1 << index_bits) - 1
    d = np.diff(np.concatenate([[-1], flat_pos])) - 1
    freqs = np.bincount(d % f, minlength=f + 1).astype(np.int64)
    freqs[f] += int(np.sum(d // f))
    return freqs


def best_index_bits(flat_pos: np.ndarray) -> int:
    """The index width (1..8) with the smallest Huffman-coded gap stream plus its table (one
    hex digit per symbol in the metadata) for these positions."""
    best, best_bits = 8, None
    for w in range(1, 9):
        fr = _gap_freqs(flat_pos, w)
        lengths = huffman.code_lengths(fr)
        n = huffman.encoded_bits(fr, lengths) + 8 * len(huffman.lengths_to_hex(lengths))
        if best_bits is None or n < best_bits:
            best, best_bits = w, n
    return best


def _check_index_bits(index_bits) -> None:
    if index_bits != "auto" and (isinstance(index_bits, bool) or not isinstance(index_bits, int)
                                 or not 1 <= index_bits <= 8):
        raise ValueError(f"index_bits must be an int in [1, 8] or 'auto', got {index_bits!r}")


def pack_layer(layer, index_bits: Union[int, str] = "auto", chunk: int = DEFAULT_CHUNK) -> Dict:
    """Storage streams of one Codebook layer: {'index_bits', 'nnz', 'gaps': (blob, lengths,
    nsym), 'codes': (blob, lengths, nsym)}. Validates the layer's resident state first."""
    _check_index_bits(index_bits)
    rows, cols = resident.validate(layer.codebook.detach(), layer.codes, layer.gaps,
                                   layer.row_counts, layer.weight_shape, layer.bits)
    k = int(np.prod(layer.weight_shape[1:]))
    flat = (rows * k + cols).cpu()
    codes = layer.codes.cpu()[layer.gaps.cpu() != resident.FILLER].numpy()
    w = best_index_bits(flat.numpy()) if index_bits == "auto" else index_bits
    gaps = gap_symbols(flat, w).numpy()
    out = {"index_bits": w, "nnz": int(flat.numel())}
    for name, sym, alphabet in (("gaps", gaps, 1 << w), ("codes", codes, 256)):
        lengths = huffman.code_lengths(np.bincount(sym, minlength=alphabet))
        out[name] = (huffman.encode(sym, lengths, chunk), lengths, int(sym.size))
    return out


def _codebook_layers(model: nn.Module):
    from ..codebook import CodebookConv2d, CodebookFire, CodebookLinear
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (CodebookConv2d, CodebookLinear))]
    fires = [n for n, m in model.named_modules() if isinstance(m, CodebookFire)]
    return layers, fires


# ------------------------------------------------------------------------------------- save --
def save(model: nn.Module, path: Union[str, os.PathLike], index_bits: Union[int, str] = "auto",
         codebook_dtype: str = "float32", chunk: int = DEFAULT_CHUNK) -> int:
    """Write `model` (after compress) to `path`; returns the file size in bytes.

    index_bits: relative-index width of the stored gap stream (1..8, or 'auto' (default): per
    layer the width with the smallest Huffman-coded stream + table; a filler symbol bridges
    longer gaps). codebook_dtype: 'float32' (exact round trip)
    or 'float16' (centroids rounded to half precision)."""
    from safetensors.torch import save as st_save
    _check_index_bits(index_bits)
    if codebook_dtype not in _DTYPES:
        raise ValueError(f"codebook_dtype must be one of {list(_DTYPES)}, got {codebook_dtype!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= huffman.MAX_CHUNK:
        raise ValueError(f"chunk must be an int in [1, {huffman.MAX_CHUNK}], got {chunk!r}")
    layers, fires = _codebook_layers(model)
    blobs: List[bytes] = []
    codebooks: List[Tensor] = []
    off = cb_off = 0
    meta_layers = []
    owned = set()
    for name, m in layers:
        p = pack_layer(m, index_bits, chunk)
        entry = {"name": name, "kind": "conv2d" if hasattr(m, "kernel_size") else "linear",
                 "shape": list(m.weight_shape), "bits": m.bits, "n": int(m.codebook.numel()),
                 "cb_off": cb_off, "nnz": p["nnz"], "index_bits": p["index_bits"],
                 "bias": m.bias is not None}
        if entry["kind"] == "conv2d":
            entry["stride"], entry["padding"] = list(m.stride), list(m.padding)
        for s in ("gaps", "codes"):
            blob, lengths, nsym = p[s]
            entry[s] = {"off": off, "len": len(blob), "nsym": nsym, "crc": zlib.crc32(blob),
                        "table": huffman.lengths_to_hex(lengths)}
            blobs.append(blob)
            off += len(blob)
        codebooks.append(m.codebook.detach().cpu().float())
        cb_off += int(m.codebook.numel())
        meta_layers.append(entry)
        prefix = name + "." if name else ""
        owned.update(prefix + s for s in ("codebook", "codes", "gaps", "row_counts"))
    tensors: Dict[str, Tensor] = {}
    for key, t in model.state_dict().items():
        if key in owned:
            continue
        if key.startswith("__sqz_"):
            raise ValueError(f"state_dict key {key!r} collides with the container's reserved names")
        tensors[key] = t.detach().cpu().contiguous().clone()
    tensors[STREAMS] = torch.frombuffer(bytearray(b"".join(blobs)) or bytearray(1), dtype=torch.uint8)[:off].clone()
    tensors[CODEBOOKS] = (torch.cat(codebooks) if codebooks else torch.zeros(0)).to(_DTYPES[codebook_dtype])
    crc = {k: zlib.crc32(_tensor_bytes(v)) for k, v in tensors.items() if k != STREAMS}
    meta = {"format": FORMAT, "version": VERSION, "chunk": chunk, "codebook_dtype": codebook_dtype,
            "layers": meta_layers, "fires": fires, "crc": crc}
    text = json.dumps(meta, separators=(",", ":"))
    # the metadata carries the Huffman tables and offsets: a CRC guards it like the streams
    data = st_save(tensors, metadata={"sqz": text, "sqz_crc32": str(zlib.crc32(text.encode()))})
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


# ------------------------------------------------------------------------------------- read --
def _fail(msg: str):
    raise ValueError(f"invalid .sqz file: {msg}")


def _header(data: bytes) -> Dict:
    if len(data) < 8:
        _fail(f"{len(data)} bytes is too short for a safetensors header (truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > MAX_HEADER:
        _fail(f"header declares {n} bytes but the file holds {len(data) - 8} after the length "
              "(truncated or corrupt)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(f"header is not valid JSON ({e})")
    if not isinstance(header, dict):
        _fail("header is not a JSON object")
    return header


def read_metadata(source: Union[str, os.PathLike, bytes]) -> Dict:
    """The validated JSON metadata of a .sqz file (no stream is decoded)."""
    data = _read_bytes(source)
    return _check_meta(_header(data))


def _read_bytes(source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    with open(source, "rb") as f:
        return f.read()


def _int(d, key, lo, hi, where):
    v = d.get(key) if isinstance(d, dict) else None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        _fail(f"{where}: '{key}' must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _check_meta(header: Dict) -> Dict:
    """The validated 'sqz' metadata of a parsed header. Any malformed value is a ValueError
    naming it; a type the checks below did not foresee still ends as a ValueError, never as a
    TypeError / KeyError from deeper in the reader."""
    try:
        return _check_meta_fields(header)
    except (TypeError, KeyError, AttributeError, IndexError) as e:
        _fail(f"malformed metadata ({type(e).__name__}: {e})")


def _check_meta_fields(header: Dict) -> Dict:
    md = header.get("__metadata__")
    if not isinstance(md, dict) or "sqz" not in md:
        _fail("no 'sqz' metadata (not a file written by sqz_kernels.save)")
    if not isinstance(md["sqz"], str) or md.get("sqz_crc32") != str(zlib.crc32(md["sqz"].encode())):
        _fail("CRC32 mismatch in the 'sqz' metadata (corrupt header)")
    try:
        meta = json.loads(md["sqz"])
    except (TypeError, json.JSONDecodeError) as e:
        _fail(f"'sqz' metadata is not valid JSON ({e})")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        _fail(f"format is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        _fail(f"format version {meta.get('version')!r} is not supported (this reader: {VERSION})")
    _int(meta, "chunk", 1, huffman.MAX_CHUNK, "metadata")
    if not isinstance(meta.get("codebook_dtype"), str) or meta["codebook_dtype"] not in _DTYPES:
        _fail(f"codebook_dtype must be one of {list(_DTYPES)}")
    if not isinstance(meta.get("layers"), list) or not isinstance(meta.get("fires"), list) \
            or not isinstance(meta.get("crc"), dict):
        _fail("metadata needs 'layers' (list), 'fires' (list) and 'crc' (object)")
    names = set()
    total_rows = 0
    for i, L in enumerate(meta["layers"]):
        where = f"layer {i}"
        if not isinstance(L, dict) or not isinstance(L.get("name"), str):
            _fail(f"{where}: needs a string 'name'")
        where = f"layer {L['name']!r}"
        if L["name"] in names:
            _fail(f"{where}: listed twice")
        names.add(L["name"])
        kind = L.get("kind")
        shape = L.get("shape")
        ndim = {"conv2d": 4, "linear": 2}.get(kind) if isinstance(kind, str) else None
        if ndim is None:
            _fail(f"{where}: kind must be 'conv2d' or 'linear', got {kind!r}")
        if not isinstance(shape, list) or len(shape) != ndim or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_NUMEL for s in shape):
            _fail(f"{where}: shape must be {ndim} non-negative ints, got {shape!r}")
        numel = int(np.prod(shape, dtype=object))
        total_rows += shape[0]
        if numel > MAX_NUMEL or total_rows > MAX_ROWS:
            _fail(f"{where}: shape {shape} exceeds the limits ({MAX_NUMEL} weights a layer, "
                  f"{MAX_ROWS} rows in all layers together)")
        if kind == "conv2d":
            for key in ("stride", "padding"):
                v = L.get(key)
                if not isinstance(v, list) or len(v) != 2 or not all(
                        isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= 1 << 16 for a in v):
                    _fail(f"{where}: {key} must be 2 ints in [0, 65536], got {v!r}")
            if min(L["stride"]) < 1:
                _fail(f"{where}: stride must be >= 1")
        bits = _int(L, "bits", 1, 8, where)
        _int(L, "n", 1, 1 << bits, where)
        _int(L, "cb_off", 0, 1 << 40, where)
        nnz = _int(L, "nnz", 0, numel, where)
        _int(L, "index_bits", 1, 8, where)
        if not isinstance(L.get("bias"), bool):
            _fail(f"{where}: 'bias' must be true or false")
        for s in ("gaps", "codes"):
            st = L.get(s)
            sw = f"{where} stream {s!r}"
            if not isinstance(st, dict):
                _fail(f"{sw}: missing")
            _int(st, "off", 0, 1 << 40, sw)
            ln = _int(st, "len", 0, 1 << 40, sw)
            # every symbol costs at least one bit: the symbol count is bounded by the blob size
            _int(st, "nsym", 0, 8 * ln, sw)
            _int(st, "crc", 0, 0xFFFFFFFF, sw)
            if not isinstance(st.get("table"), str):
                _fail(f"{sw}: 'table' must be a hex string")
        if L["codes"]["nsym"] != nnz:
            _fail(f"{where}: code stream holds {L['codes']['nsym']} symbols but nnz = {nnz}")
        if L["gaps"]["nsym"] < nnz:
            _fail(f"{where}: gap stream holds fewer symbols than nnz = {nnz}")
    for f in meta["fires"]:
        if not isinstance(f, str) or not all(
                (f + "." if f else "") + c in names for c in ("squeeze", "expand1x1", "expand3x3")):
            _fail(f"fire {f!r}: its squeeze/expand1x1/expand3x3 layers are not all in the file")
    for k, v in meta["crc"].items():
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFFFFFFFF:
            _fail(f"crc of {k!r} must be a 32-bit unsigned int")
    return meta


def read(source: Union[str, os.PathLike, bytes]) -> Dict:
    """Parse and fully validate a .sqz file without a model. Returns {'meta', 'layers': {name:
    {'codebook', 'codes', 'gaps', 'row_counts', 'bias'?, **metadata}}, 'dense': {key: tensor}}.
    Any inconsistency raises ValueError; memory use is bounded by the file size (and the
    limit on rows over all layers, MAX_ROWS)."""
    from safetensors.torch import load as st_load
    data = _read_bytes(source)
    meta = _check_meta(_header(data))
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types on malformed containers
        _fail(f"safetensors container is malformed ({type(e).__name__}: {e})")
    for key in (STREAMS, CODEBOOKS):
        if key not in tensors:
            _fail(f"tensor {key!r} is missing")
    streams, cbs = tensors.pop(STREAMS), tensors[CODEBOOKS]
    if streams.dtype != torch.uint8 or streams.dim() != 1:
        _fail(f"{STREAMS} must be a 1-D uint8 tensor")
    if cbs.dtype != _DTYPES[meta["codebook_dtype"]] or cbs.dim() != 1:
        _fail(f"{CODEBOOKS} must be a 1-D {meta['codebook_dtype']} tensor")
    for key, t in tensors.items():
        if key not in meta["crc"]:
            _fail(f"tensor {key!r} has no CRC32 in the metadata")
        if zlib.crc32(_tensor_bytes(t)) != meta["crc"][key]:
            _fail(f"CRC32 mismatch in tensor {key!r} (corrupt data)")
    for key in meta["crc"]:
        if key != STREAMS and key not in tensors:
            _fail(f"tensor {key!r} is listed in the metadata but missing")
    cbs = tensors.pop(CODEBOOKS).float()
    raw = streams.numpy().tobytes()
    jobs, names = [], []
    for L in meta["layers"]:
        if L["cb_off"] + L["n"] > cbs.numel():
            _fail(f"layer {L['name']!r}: codebook slice runs past the codebook tensor")
        for s in ("gaps", "codes"):
            st = L[s]
            if st["off"] + st["len"] > len(raw):
                _fail(f"layer {L['name']!r} stream {s!r}: runs past the stream tensor")
            blob = raw[st["off"]: st["off"] + st["len"]]
            if zlib.crc32(blob) != st["crc"]:
                _fail(f"layer {L['name']!r} stream {s!r}: CRC32 mismatch (corrupt data)")
            lengths = huffman.lengths_from_hex(st["table"], f"layer {L['name']!r} stream {s!r} table")
            alphabet = (1 << L["index_bits"]) if s == "gaps" else L["n"]
            if lengths.size > alphabet:
                _fail(f"layer {L['name']!r} stream {s!r}: table has symbols >= {alphabet}")
            jobs.append((blob, lengths, st["nsym"]))
            names.append(f"layer {L['name']!r} stream {s!r}")
    try:
        decoded = huffman.decode_many(jobs, meta["chunk"], names)
    except ValueError as e:
        _fail(str(e))
    layers = {}
    for i, L in enumerate(meta["layers"]):
        gaps, codes = decoded[2 * i], decoded[2 * i + 1]
        shape = L["shape"]
        o = shape[0]
        k = int(np.prod(shape[1:], dtype=np.int64))
        f = (1 << L["index_bits"]) - 1
        g = torch.from_numpy(gaps.astype(np.int64))
        try:
            real, cursor = resident.decode_positions(g, torch.tensor([g.numel()]), o * k, filler=f)
        except ValueError as e:
            _fail(f"layer {L['name']!r}: {e}")
        if int(real.sum()) != L["nnz"]:
            _fail(f"layer {L['name']!r}: gap stream holds {int(real.sum())} weights, nnz = {L['nnz']}")
        flat = cursor[real]
        c = torch.from_numpy(codes)
        if c.numel() and int(c.max()) >= L["n"]:
            _fail(f"layer {L['name']!r}: a code ({int(c.max())}) is >= the codebook size {L['n']}")
        rc, rg, rrc = resident.encode_positions(flat // max(k, 1), flat % max(k, 1), c, o)
        entry = dict(L)
        entry.update(codebook=cbs[L["cb_off"]: L["cb_off"] + L["n"]].clone(), codes=rc, gaps=rg,
                     row_counts=rrc)
        layers[L["name"]] = entry
    return {"meta": meta, "layers": layers, "dense": tensors}


# ------------------------------------------------------------------------------------- load --
def load(source: Union[str, os.PathLike, bytes], model: nn.Module, strict: bool = True) -> nn.Module:
    """Load a .sqz file into a structurally matching `model`, in place (also returned).

    The model may be dense (its Conv2d / Linear / Fire-like modules named in the file are
    replaced by Codebook modules) or already compressed. The file is fully validated before the
    model is touched. strict: every other state_dict entry of the model must be in the file."""
    from ..codebook import CodebookConv2d, CodebookFire, CodebookLinear
    content = read(source)
    meta, layers, dense = content["meta"], content["layers"], content["dense"]

    def get(name):
        try:
            return model.get_submodule(name) if name else model
        except AttributeError:
            raise ValueError(f"load: the model has no module {name!r} (named in the file)") from None

    new_mods = {}
    for name, L in layers.items():
        old = get(name)
        if L["kind"] == "conv2d":
            m = CodebookConv2d(L["shape"][1], L["shape"][0], tuple(L["shape"][2:]), tuple(L["stride"]),
                               tuple(L["padding"]), bias=L["bias"], bits=L["bits"])
            # a dense conv must be one the file's layer computes: groups, dilation and the padding
            # mode are not in the file (a grouped or reflect-padded conv would silently change)
            from .api import _supported_conv
            ok = isinstance(old, (nn.Conv2d, CodebookConv2d)) and tuple(old.kernel_size) == m.kernel_size \
                and tuple(old.stride) == m.stride and tuple(getattr(old, "padding", ())) == m.padding \
                and old.in_channels == m.in_channels and old.out_channels == m.out_channels \
                and (not isinstance(old, nn.Conv2d) or _supported_conv(old))
        else:
            m = CodebookLinear(L["shape"][1], L["shape"][0], bias=L["bias"], bits=L["bits"])
            ok = isinstance(old, (nn.Linear, CodebookLinear)) and old.in_features == m.in_features \
                and old.out_features == m.out_features
        if ok:
            ok = (getattr(old, "bias", None) is not None) == L["bias"]
        if not ok:
            raise ValueError(f"load: module {name!r} ({type(old).__name__}) does not match the file's "
                             f"{L['kind']} of shape {L['shape']}")
        m.set_compressed(L["codebook"], L["codes"], L["gaps"], L["row_counts"])
        # a layer that took in its ReLU (sk.fold_relu_: the nn.ReLU after it became nn.Identity)
        # keeps it, or loading into a folded model would silently drop that ReLU
        m.relu = bool(getattr(old, "relu", False))
        m.pool = getattr(old, "pool", None) if isinstance(m, CodebookConv2d) else None  # sk.fold_pool_
        if isinstance(m, CodebookConv2d):
            m.global_pool = getattr(old, "global_pool", False)
        m.to(next(iter(old.parameters()), torch.zeros(0)).device)
        m.train(old.training)
        if not name and type(model) is not type(m):
            # a module cannot replace itself: a file of one layer loads into that Codebook layer
            raise ValueError(f"load: the file's {L['kind']} is the whole model; load it into a "
                             f"{type(m).__name__} (the model is a {type(model).__name__})")
        new_mods[name] = m
    # the Fires, assembled (and their geometry checked) before any change
    fires = {}
    for fname in meta["fires"]:
        old = get(fname)
        if not fname and not isinstance(model, CodebookFire):
            raise ValueError("load: the file's Fire is the whole model; load it into a CodebookFire "
                             f"(the model is a {type(model).__name__})")
        p = fname + "." if fname else ""
        parts = [new_mods[p + c] for c in ("squeeze", "expand1x1", "expand3x3")]
        try:
            fire = CodebookFire.from_codebook_convs(*parts)
        except ValueError as e:
            raise ValueError(f"load: Fire {fname!r}: {e}") from None
        fire.train(old.training)
        fire.pool = getattr(old, "pool", None)  # a folded max-pool (sk.fold_pool_) stays
        fires[fname] = fire

    def swap(name, mod):
        if name:
            replace_submodule(model, name, mod)
        elif isinstance(mod, CodebookFire):
            pass  # the model is that CodebookFire: its three convs were swapped
        else:  # the model is that Codebook layer (checked above): it takes the streams
            model.bits = mod.bits
            model.set_compressed(mod.codebook, mod.codes, mod.gaps, mod.row_counts)

    # all checks of the dense part before any change

    # dry run on the key sets: the state_dict the model will have after the swaps
    owned = {(n + "." if n else "") + s for n in new_mods for s in ("codebook", "codes", "gaps", "row_counts")}
    for name in new_mods:
        owned |= {k for k in _keys_under(model, name)}
    expected = {k: v for k, v in model.state_dict().items() if k not in owned}
    for name, m in new_mods.items():
        if m.bias is not None:
            expected[(name + "." if name else "") + "bias"] = m.bias
    for k, t in dense.items():
        if k not in expected:
            raise ValueError(f"load: the file has tensor {k!r} that the model lacks")
        if tuple(expected[k].shape) != tuple(t.shape):
            raise ValueError(f"load: tensor {k!r} has shape {list(t.shape)} in the file, "
                             f"{list(expected[k].shape)} in the model")
        # float -> float casts (a model saved in float64, loaded into float32) are fine; a
        # complex, bool or integer tensor in place of a float one (or the reverse) is not
        e = expected[k].dtype
        if (e.is_floating_point != t.dtype.is_floating_point or e.is_complex or t.dtype.is_complex
                or (not e.is_floating_point and e != t.dtype)):
            raise ValueError(f"load: tensor {k!r} has dtype {t.dtype} in the file, {e} in the model")
    missing = [k for k in expected if k not in dense]
    if strict and missing:
        raise ValueError(f"load: the file lacks {len(missing)} model tensors, e.g. {missing[:3]}")
    for name, m in new_mods.items():
        swap(name, m)
    for fname, fire in fires.items():
        swap(fname, fire)
    sd = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, t in dense.items():
            sd[k].copy_(t)
    return model


def _keys_under(model: nn.Module, name: str):
    mod = model.get_submodule(name) if name else model
    p = name + "." if name else ""
    return [p + k for k in mod.state_dict().keys()]
