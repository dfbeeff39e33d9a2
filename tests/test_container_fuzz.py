"""Loader robustness: every malformed .sqz must raise ValueError (never another exception, a
crash or an unbounded allocation), and anything accepted must decode to the original content.

Also a standalone fuzz harness:
    python tests/test_container_fuzz.py --iterations 20000 --seed 1 [--file model.sqz]
(random bit flips, truncations, byte overwrites, insertions and deletions; exits 1 on a finding).
"""
import argparse
import json
import os
import struct
import sys
import zlib

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sqz_kernels import compression as C  # noqa: E402
from sqz_kernels.compression import container  # noqa: E402


def make_file() -> bytes:
    import sqz_kernels as sk
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), sk.fire.EagerFire(8, 4, 8, 8),
                        nn.Flatten(), nn.Linear(16 * 4, 10))
    C.compress(net, density=0.3, bits=4, progress=False)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sqz_fuzz_{os.getpid()}.sqz")
    C.save(net, path)
    with open(path, "rb") as f:
        data = f.read()
    os.remove(path)
    return data


def fingerprint(content) -> list:
    out = []
    for name, L in sorted(content["layers"].items()):
        out.append((name, L["codebook"].numpy().tobytes(), L["codes"].numpy().tobytes(),
                    L["gaps"].numpy().tobytes(), L["row_counts"].numpy().tobytes()))
    for k, t in sorted(content["dense"].items()):
        out.append((k, t.numpy().tobytes()))
    return out


def check(data: bytes, original) -> str:
    """'rejected' (ValueError) or 'accepted' (and identical); anything else raises."""
    try:
        content = C.read(data)
    except ValueError:
        return "rejected"
    if fingerprint(content) != original:
        raise AssertionError("a corrupted file was accepted with different content")
    return "accepted"


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    op = rng.integers(5)
    i = int(rng.integers(len(b)))
    if op == 0:
        b[i] ^= 1 << int(rng.integers(8))
    elif op == 1:
        b = b[: i]
    elif op == 2:
        n = int(rng.integers(1, 9))
        b[i: i + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif op == 3:
        b[i:i] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
    else:
        del b[i: i + int(rng.integers(1, 9))]
    return bytes(b)


# --------------------------------------------------------------------------- crafted files --
def split(data: bytes):
    from safetensors.torch import load as st_load
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return json.loads(header["__metadata__"]["sqz"]), dict(st_load(data))


def rebuild(meta, tensors) -> bytes:
    """Re-save with every CRC recomputed, so that the deeper checks are what must catch it."""
    from safetensors.torch import save as st_save
    raw = tensors[container.STREAMS].numpy().tobytes()
    for L in meta["layers"]:
        for s in ("gaps", "codes"):
            st = L[s]
            st["crc"] = zlib.crc32(raw[st["off"]: st["off"] + st["len"]])
    meta["crc"] = {k: zlib.crc32(container._tensor_bytes(v)) for k, v in tensors.items()
                   if k != container.STREAMS}
    text = json.dumps(meta)
    return st_save(tensors, metadata={"sqz": text, "sqz_crc32": str(zlib.crc32(text.encode()))})


@pytest.fixture(scope="module")
def good():
    data = make_file()
    return data, fingerprint(C.read(data))


def test_rebuild_is_faithful(good):
    data, fp = good
    assert check(rebuild(*split(data)), fp) == "accepted"


def test_truncated_everywhere(good):
    data, fp = good
    for n in list(range(0, 200)) + list(range(200, len(data), 97)):
        with pytest.raises(ValueError):
            C.read(data[:n])


def test_every_bit_flip_sampled(good):
    data, fp = good
    rng = np.random.default_rng(0)
    for i in rng.choice(len(data) * 8, size=400, replace=False):
        b = bytearray(data)
        b[i // 8] ^= 1 << (i % 8)
        assert check(bytes(b), fp) == "rejected"          # a CRC guards every byte


def test_random_mutations(good):
    data, fp = good
    rng = np.random.default_rng(1)
    for _ in range(300):
        check(mutate(data, rng), fp)


def _crafted(good, fn):
    meta, tensors = split(good[0])
    fn(meta, tensors)
    return rebuild(meta, tensors)


def _empty_layer(name, rows, table="", nsym=0):
    stream = {"off": 0, "len": 0, "nsym": nsym, "crc": 0, "table": table}
    return {"name": name, "kind": "linear", "shape": [rows, 1], "bits": 1, "n": 1, "cb_off": 0,
            "nnz": 0, "index_bits": 1, "bias": False, "gaps": dict(stream), "codes": dict(stream)}


def _layer(meta, kind="conv2d"):
    return next(L for L in meta["layers"] if L["kind"] == kind)


@pytest.mark.parametrize("fn, match", [
    # huge declared sizes: refused from the metadata, before any allocation
    (lambda m, t: _layer(m).update(shape=[1 << 40, 1, 1, 1]), "shape"),
    (lambda m, t: _layer(m).update(shape=[1 << 25, 4, 1, 1]), "limits"),
    (lambda m, t: _layer(m)["gaps"].update(nsym=10 ** 12), "nsym"),
    (lambda m, t: _layer(m)["codes"].update(len=10 ** 11), "runs past"),
    (lambda m, t: _layer(m)["codes"].update(len=10 ** 13), "len"),
    (lambda m, t: _layer(m).update(nnz=10 ** 9), "nnz"),
    # bad Huffman tables
    (lambda m, t: _layer(m)["gaps"].update(table="1111"), "Kraft"),
    (lambda m, t: _layer(m)["codes"].update(table="zz"), "hex"),
    (lambda m, t: _layer(m)["codes"].update(table="1" * 300), "256"),
    (lambda m, t: _layer(m)["codes"].update(table="2" * 4), "invalid code|chunk|bit length"),
    # gaps that run past the tensor: the same streams declared for a smaller weight
    (lambda m, t: _layer(m).update(shape=[2, 3, 3, 3]), "past|nnz"),
    # codes >= 2**bits / >= n
    (lambda m, t: _layer(m).update(bits=1, n=2), "n'|table has symbols|code"),
    (lambda m, t: _layer(m).update(n=99), "'n'"),
    (lambda m, t: _layer(m).update(cb_off=10 ** 6), "codebook slice"),
    (lambda m, t: m.update(version=2), "version"),
    (lambda m, t: m.update(chunk=0), "chunk"),
    (lambda m, t: m["fires"].append("ghost"), "ghost"),
    (lambda m, t: t.update({container.STREAMS: t[container.STREAMS][:-5]}), "runs past|CRC"),
    (lambda m, t: t.update({container.CODEBOOKS: t[container.CODEBOOKS].half()}), "float32"),
    # values of the wrong JSON type where a string is expected (once a TypeError)
    (lambda m, t: m.update(codebook_dtype=[]), "codebook_dtype"),
    (lambda m, t: _layer(m).update(kind=[]), "kind"),
    # layers without entries cost a row_counts allocation but no file bytes: rows are limited
    # over all layers together (once 16 layers of 2**24 rows each took 1 GB from an 8 KB file)
    (lambda m, t: m["layers"].extend(_empty_layer(f"e{i}", 1 << 23) for i in range(3)), "limits"),
])
def test_crafted_files_rejected(good, fn, match):
    with pytest.raises(ValueError, match=match):
        C.read(_crafted(good, fn))


def test_huge_header_length(good):
    data = good[0]
    for n in (2 ** 63, 2 ** 40, len(data)):
        with pytest.raises(ValueError, match="header"):
            C.read(struct.pack("<Q", n) + data[8:])


def test_huge_tensor_in_safetensors_header(good):
    data = good[0]
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if not k.startswith("__"))
    header[key].update(shape=[2 ** 40], data_offsets=[0, 2 ** 42])    # 4 TiB declared
    hb = json.dumps(header).encode()
    with pytest.raises(ValueError, match="malformed"):
        C.read(struct.pack("<Q", len(hb)) + hb + data[8 + n:])


def test_failed_load_leaves_model_untouched(good):
    import sqz_kernels as sk
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), sk.fire.EagerFire(8, 4, 8, 8),
                        nn.Flatten(), nn.Linear(16 * 4, 10))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bad = bytearray(good[0])
    bad[-3] ^= 0x10
    with pytest.raises(ValueError):
        C.load(bytes(bad), net)
    assert isinstance(net[0], nn.Conv2d)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_many_streams_with_long_codes_keep_the_tables_bounded(good, monkeypatch):
    # Each stream's lookup table has 2**(its longest code) entries: 600 one-weight layers whose
    # gap symbol has a 15-bit code once cost 600 * 128 KB of tables from a few KB of file. They
    # are decoded in batches of at most LUT_BUDGET entries (shrunk here to see several batches).
    from sqz_kernels.compression import huffman
    meta, tensors = split(good[0])
    raw = bytearray(tensors[container.STREAMS].numpy().tobytes())
    gap_len = np.array([15] + list(range(1, 15)) + [15], dtype=np.uint8)  # symbol 0: 15 bits
    gap_blob = huffman.encode(np.zeros(1, dtype=np.uint8), gap_len, 2048)
    code_len = np.array([1], dtype=np.uint8)
    code_blob = huffman.encode(np.zeros(1, dtype=np.uint8), code_len, 2048)
    for i in range(600):
        L = _empty_layer(f"long{i}", 1)
        L.update(nnz=1, index_bits=4)
        for st, blob, lens in (("gaps", gap_blob, gap_len), ("codes", code_blob, code_len)):
            L[st].update(off=len(raw), len=len(blob), nsym=1, table=huffman.lengths_to_hex(lens))
            raw += blob
        meta["layers"].append(L)
    tensors[container.STREAMS] = torch.frombuffer(raw, dtype=torch.uint8).clone()
    data = rebuild(meta, tensors)
    entries = []  # table entries of each batch
    real = huffman._decode_batch

    def spy(batch, streams, *rest):
        entries.append(sum(1 << int(streams[i][1].max()) for i in batch))
        return real(batch, streams, *rest)

    monkeypatch.setattr(huffman, "LUT_BUDGET", 1 << 19)
    monkeypatch.setattr(huffman, "_decode_batch", spy)
    content = C.read(data)
    assert len(entries) >= 600 * (1 << 15) // (1 << 19) and max(entries) <= 1 << 19
    for i in range(600):  # one weight at column 0 with code 0
        L = content["layers"][f"long{i}"]
        assert L["gaps"].tolist() == [0] and L["codes"].tolist() == [0]
        assert L["row_counts"].tolist() == [1]
    rest = {"layers": {k: v for k, v in content["layers"].items() if not k.startswith("long")},
            "dense": content["dense"]}
    assert fingerprint(rest) == good[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fuzz the .sqz loader")
    ap.add_argument("--iterations", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--file", help="a .sqz file to mutate (default: a small generated model)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.file:
        with open(a.file, "rb") as f:
            data = f.read()
    else:
        data = make_file()
    fp = fingerprint(C.read(data))
    rng = np.random.default_rng(a.seed)
    counts = {"rejected": 0, "accepted": 0}
    for i in range(a.iterations):
        m = mutate(data, rng)
        try:
            counts[check(m, fp)] += 1
        except Exception as e:  # a finding: save the input for reproduction
            path = f"sqz_fuzz_crash_{a.seed}_{i}.sqz"
            with open(path, "wb") as f:
                f.write(m)
            print(f"FINDING at iteration {i}: {type(e).__name__}: {e} (input saved to {path})")
            return 1
    print(f"{a.iterations} mutations of a {len(data)}-byte file: {counts['rejected']} rejected with "
          f"ValueError, {counts['accepted']} accepted with identical content, 0 findings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
