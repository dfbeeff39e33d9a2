"""Sparse-codebook kernels (issue 5) against the float64 reference (decoded weight + ATen conv)."""
import itertools
import math
import os
import subprocess
import sys
import textwrap

import numpy as np

import pytest
import torch
import torch.nn.functional as F

import sqz_kernels  # noqa: F401
from sqz_kernels import codebook_ops as co

sys.path.insert(0, os.path.dirname(__file__))
from codebook_helpers import args, encode_rows, make_layer  # noqa: E402

ISAS = ["avx512", "avx2", "scalar"]


def _available_isas():
    out = []
    best = torch.ops.sqz_kernels.cpu_isa()
    for isa in ISAS[ISAS.index(best):]:
        out.append(isa)
    return out


@pytest.fixture(params=_available_isas())
def isa(request):
    torch.ops.sqz_kernels.set_cpu_isa(request.param)
    yield request.param
    torch.ops.sqz_kernels.set_cpu_isa("best")


def _poison(shape, dtype):
    # Freed NaN-filled memory of the output's size is what the allocator hands out next, so an
    # element the kernel does not write shows up as NaN (best effort; malloc may differ).
    t = torch.full(shape, float("nan"), dtype=dtype)
    del t


def _close(y, ref):
    assert not torch.isnan(y).any(), "unwritten (NaN) output elements"
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * scale)


def _conv_ref(x, L, C, k, s, p, relu):
    O = L["row_counts"].shape[0]
    w = L["dense"].reshape(O, C, k[0], k[1])
    b = L["bias"].double() if L["bias"] is not None else None
    y = F.conv2d(x.double(), w, b, s, p)
    return F.relu(y) if relu else y


CONV_CASES = [
    # C, O, k, stride, pad, H, W
    (16, 24, (1, 1), (1, 1), (0, 0), 13, 13),
    (16, 24, (3, 3), (1, 1), (1, 1), 13, 13),
    (3, 20, (7, 7), (2, 2), (0, 0), 37, 31),
    (3, 17, (3, 3), (2, 2), (0, 0), 23, 25),
    (7, 5, (3, 3), (2, 2), (1, 1), 10, 11),
    (5, 9, (1, 1), (2, 2), (0, 0), 9, 8),
    (4, 6, (3, 3), (1, 1), (2, 2), 1, 1),
    (11, 13, (3, 1), (1, 2), (1, 0), 1, 17),
    (2, 3, (7, 7), (1, 1), (3, 3), 6, 70),
    (40, 8, (3, 3), (1, 1), (1, 1), 5, 1),
    (3, 10, (3, 3), (2, 2), (0, 0), 9, 67),   # stride-2 packing: two whole vectors + a tail
    (2, 4, (3, 3), (2, 2), (1, 1), 5, 32),    # 16 / 15 columns per copy: the last readable input
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"C{c[0]}O{c[1]}k{c[2][0]}x{c[2][1]}s{c[3][0]}p{c[4][0]}_{c[5]}x{c[6]}")
@pytest.mark.parametrize("density", [1.0, 0.33, 0.1, 0.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_matches_reference(case, density, channels_last, isa):
    C, O, k = case[:3]
    L = make_layer(O, C * k[0] * k[1], density, bits=6, seed=hash(case) % 1000, force_fillers=True)
    check_conv_case(case, L, channels_last)


def check_conv_case(case, L, channels_last, relus=(True, False)):
    """codebook_conv2d of layer L on a fresh [2, C, H, W] input (NaN-poisoned output memory) ==
    the float64 reference, in x's memory format; shared with test_codebook_quads.py."""
    C, O, k, s, p, H, W = case
    x = torch.randn(2, C, H, W)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    Ho = (H + 2 * p[0] - k[0]) // s[0] + 1
    Wo = (W + 2 * p[1] - k[1]) // s[1] + 1
    _poison((2, O, Ho, Wo), torch.float32)
    for relu in relus:
        y = co.codebook_conv2d(x, *args(L), k, s, p, relu)
        assert y.shape == (2, O, Ho, Wo)
        if channels_last and not x.is_contiguous():
            assert y.is_contiguous(memory_format=torch.channels_last)
        else:
            assert y.is_contiguous()
        _close(y, _conv_ref(x, L, C, k, s, p, relu))


@pytest.mark.parametrize("bits", range(1, 9))
def test_conv2d_all_bit_widths(bits):
    C, O = 12, 10
    L = make_layer(O, C * 9, 0.33, bits=bits, seed=bits)
    x = torch.randn(1, C, 9, 7)
    _close(co.codebook_conv2d(x, *args(L), 3, 1, 1, False), _conv_ref(x, L, C, (3, 3), 1, 1, False))


def test_conv2d_fillers_and_empty_rows():
    # K = 64*9 = 576 > 255: row 0 holds one weight at position 575 behind two fillers; row 1 is empty.
    C, O = 64, 6
    L = make_layer(O, C * 9, 0.05, bits=4, seed=3, force_fillers=True)
    assert (L["gaps"] == 255).sum() >= 2
    assert L["row_counts"][1] == 0
    x = torch.randn(1, C, 8, 8)
    y = co.codebook_conv2d(x, *args(L), 3, 1, 1, False)
    _close(y, _conv_ref(x, L, C, (3, 3), 1, 1, False))
    # an empty row outputs exactly its bias
    torch.testing.assert_close(y[0, 1], L["bias"][1].expand(8, 8))


def test_conv2d_trailing_filler_and_no_bias():
    # a row that ends on a filler entry (allowed while the cursor stays < K)
    C, O = 40, 2  # K = 360
    codes = torch.tensor([3, 0, 1, 0], dtype=torch.uint8)
    gaps = torch.tensor([4, 255, 9, 255], dtype=torch.uint8)  # row0: pos 4, filler -> 259; row1: pos 9, -> 264
    counts = torch.tensor([2, 2], dtype=torch.int32)
    cb = torch.randn(4)
    x = torch.randn(1, C, 3, 3)
    y = co.codebook_conv2d(x, cb, codes, gaps, counts, None, 3, 1, 1, False)
    w = co.codebook_decode(cb.double(), codes, gaps, counts, C * 9)
    assert w[0, 4] == cb[3].double() and w[1, 9] == cb[1].double() and (w != 0).sum() == 2
    _close(y, F.conv2d(x.double(), w.reshape(2, C, 3, 3), padding=1))


@pytest.mark.parametrize("C", [1, 3, 4, 5])
def test_conv2d_channels_last_slices_of_few_channels(C):
    # Inputs of <= 4 channels in a channels-last layout are packed by gathers (one per channel and
    # 16 pixels), others by 16x16 transposes: channel slices of a wider channels-last tensor (pixel
    # stride 8 > C) and every other column (stride 2), as conv1 (3x3 / 2) and a 1x1 conv.
    wide = torch.randn(2, 8, 21, 38).to(memory_format=torch.channels_last)
    for x in (wide[:, 1:1 + C], wide[:, :C, :, ::2]):
        assert x.stride(1) == 1 and x.stride(3) >= 8
        for k, s, p in ((3, 2, 0), (1, 1, 0), (3, 1, 1)):
            L = make_layer(10, C * k * k, 0.5, 6, seed=C + k)
            _close(co.codebook_conv2d(x, *args(L), k, s, p, True), _conv_ref(x, L, C, (k, k), s, p, True))


@pytest.mark.parametrize("C", [1, 2, 3, 4])
def test_conv2d_dense_channels_last_rgb(C, isa):
    """A dense channels_last input of 2-4 channels (pixel stride == C) is deinterleaved by permutes
    (16 pixels = C whole vectors), and under a kernel of several columns each input row is moved
    once and the column copies are cut from it: widths that leave 1 / 15 pixels in the last group
    of 16 (the masked loads of the tail: NaN placed right after x's last pixel row must not show),
    7x7 / 2 (conv1 of SqueezeNet 1.0), 3x3 / 2 and / 1, and 1x1; every ISA."""
    for W in (17, 31, 224):
        base = torch.randn(2 * 9 * W * C + 64)
        base[2 * 9 * W * C:] = float("nan")  # beyond x: a read past its end would bring NaN in
        x = base[:2 * 9 * W * C].view(2, 9, W, C).permute(0, 3, 1, 2)
        assert x.is_contiguous(memory_format=torch.channels_last) and x.stride(3) == C
        for k, s, p in ((7, 2, 3), (3, 2, 0), (3, 1, 1), (1, 1, 0)):
            L = make_layer(12, C * k * k, 0.4, 6, seed=C + k)
            _poison((2, 12, 9, W), torch.float32)
            _close(co.codebook_conv2d(x, *args(L), k, s, p, True), _conv_ref(x, L, C, (k, k), s, p, True))


def test_conv2d_noncontiguous_and_batch0():
    C, O = 8, 12
    L = make_layer(O, C * 9, 0.33, 6)
    xb = torch.randn(3, 2 * C, 15, 16)
    x = xb[:, ::2, 1:, ::2]  # non-contiguous in every dimension
    _close(co.codebook_conv2d(x, *args(L), 3, 2, 1, True), _conv_ref(x, L, C, (3, 3), 2, 1, True))
    x0 = torch.randn(0, C, 5, 5)
    assert co.codebook_conv2d(x0, *args(L), 3, 1, 1, True).shape == (0, O, 5, 5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_conv2d_squeeze_reads_x_in_place(threads, isa):
    """NCHW 1x1 convs with O <= C, few vector loads per input channel and maps of >= 256 pixels
    read x in place: a band is one flat run per channel, rounded up to 16 pixels; a band whose
    rounded run would pass the end of x's storage is packed (the last band of a contiguous x whose
    H * W is not a multiple of 16), views of a larger tensor (rows or channels cut from it, every
    second channel) read in place to their last band (also an expanded x: channel stride 0), and
    in batch 2 a run may read into the next image. Unstructured and block-4 layers (a row quad
    loads each input vector once for its four rows); every ISA's kernels, and float64. (That the
    path is taken: channel offsets H * W instead of x's channel stride fail the strided views.)"""
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for C, O, H, W, quads in ((40, 8, 17, 19, False), (64, 16, 16, 16, True),
                                  (33, 12, 23, 13, False), (48, 16, 29, 31, True)):
            L = make_layer(O, C, 0.15, 6, seed=C, quads=quads)
            big = torch.randn(2, C + 3, H + 3, W)
            for x in (torch.randn(2, C, H, W), big[:, 1:1 + C, 1:1 + H], big[:, :C, 2:2 + H],
                      torch.randn(1, 2 * C, H, W)[:, ::2],
                      torch.randn(1, 1, H, W).expand(2, C, H, W)):
                for relu in (True, False):
                    _poison((x.shape[0], O, H, W), torch.float32)
                    y = co.codebook_conv2d(x, *args(L), 1, 1, 0, relu)
                    _close(y, _conv_ref(x, L, C, (1, 1), 1, 0, relu))
            x = torch.randn(2, C, H, W, dtype=torch.float64)
            a = list(args(L))
            a[0], a[4] = a[0].double(), a[4].double()
            _close(co.codebook_conv2d(x, *a, 1, 1, 0, True), _conv_ref(x, L, C, (1, 1), 1, 0, True))
    finally:
        torch.set_num_threads(n)


def _layer_from_mask(mask, bits=6, seed=0):
    """A compressed layer (make_layer's dict) with the given [O, K] pattern of stored weights."""
    rng = np.random.default_rng(seed)
    n = 2 ** bits
    codebook = rng.standard_normal(n) * 0.5
    codes_dense = rng.integers(0, n, size=mask.shape)
    codes, gaps, counts = encode_rows(codes_dense, mask)
    return dict(codebook=torch.tensor(codebook, dtype=torch.float32), codes=torch.from_numpy(codes),
                gaps=torch.from_numpy(gaps), row_counts=torch.from_numpy(counts),
                bias=torch.tensor(rng.standard_normal(mask.shape[0]) * 0.1, dtype=torch.float32),
                dense=torch.from_numpy(np.where(mask, codebook[codes_dense], 0.0)))


# Input channels a layer's rows reach, by group of 16: 3 (gathered), 12 (transposed), none
# (skipped), 8 (gathered: the most a group is gathered with), and 5 of a last short group.
_USED = [1, 5, 14] + list(range(16, 28)) + [48, 49, 51, 53, 55, 58, 60, 63] + [64, 66, 67, 69, 71]


def _mask_reaching(O, C, taps, used, rng, quads=False):
    """[O, C * taps] pattern in which every channel of `used` is reached by one or two rows (at a
    random tap) and no other channel is: few entries per channel, as a block-pruned layer at 10 %.
    quads: rows 4g..4g+3 share one pattern (O a multiple of 4)."""
    R = O // 4 if quads else O
    mask = np.zeros((R, C * taps), dtype=bool)
    for c in used:
        for o in rng.choice(R, size=int(rng.integers(1, 3)), replace=False):
            mask[o, c * taps + int(rng.integers(0, taps))] = True
    return np.repeat(mask, 4, axis=0) if quads else mask


@pytest.mark.parametrize("quads", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_channels_last_packs_only_used_channels(threads, quads, isa):
    """A channels_last layer whose rows reach few input channels packs only those: groups of 16
    channels with <= 8 used ones by 16-lane gathers, fuller groups by transposes, empty groups not
    at all. The unused channels of x hold NaN, so a gather of a wrong channel (or a plane the rows
    read but nobody wrote) shows in the output. 1x1 convs (flat bands), a 3x3 / stride-2 conv
    (three column copies, two row phases), and the Fire's squeeze; maps of >= 256 pixels whose
    bands are not whole vectors; 1, 2 and 3 threads (bands split mid-map); rows in shared quads
    (the channels are taken from a quad's first row); every ISA (only AVX-512 packs selectively)."""
    rng = np.random.default_rng(threads)
    C, N, H, W = 72, 2, 17, 19
    unused = [c for c in range(C) if c not in _USED]
    x = torch.randn(N, C, H, W)
    x[:, unused] = float("nan")
    xz = x.nan_to_num(0.0)  # the reference: unused channels only ever meet zero weights
    x = x.contiguous(memory_format=torch.channels_last)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for k, s, p in ((1, 1, 0), (3, 2, 1)):
            L = _layer_from_mask(_mask_reaching(8, C, k * k, _USED, rng, quads), seed=k)
            for relu in (True, False):
                _poison((N, 8, H, W), torch.float32)
                y = co.codebook_conv2d(x, *args(L), k, s, p, relu)
                _close(y, _conv_ref(xz, L, C, (k, k), s, p, relu))
        layers = [_layer_from_mask(_mask_reaching(8, C, 1, _USED, rng, quads), seed=1),
                  make_layer(5, 8, 0.5, 6, seed=2), make_layer(6, 9 * 8, 0.5, 6, seed=3)]
        y = co.codebook_fused_fire(x, *args(layers[0]), *args(layers[1]), *args(layers[2]))
        _close(y, _fire_ref(xz, layers))
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_conv2d_squeeze_of_one_tile_map(threads):
    """A squeeze-like layer (O <= C) on a map of one pixel tile runs in bands of rows, not split by
    output channels (so no thread packs or transposes the whole input), and so does every layer
    over a channels_last x; an NCHW layer with O > C on the same map is still split by channels.
    NCHW and channels_last, unstructured and block-4, batch 1 and 2."""
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for C, O, quads in ((48, 32, False), (64, 48, True), (32, 64, False)):
            L = make_layer(O, C, 0.3, 6, seed=O, quads=quads)
            for N, cl in itertools.product((1, 2), (False, True)):
                x = torch.randn(N, C, 13, 13)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                _poison((N, O, 13, 13), torch.float32)
                y = co.codebook_conv2d(x, *args(L), 1, 1, 0, True)
                assert y.is_contiguous(memory_format=torch.channels_last if cl else
                                       torch.contiguous_format)
                _close(y, _conv_ref(x, L, C, (1, 1), 1, 0, True))
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_conv2d_channels_last_squeeze_l1_blocks(threads):
    """A squeeze-like layer over channels_last x with >= 16 rows of >= 32 entries walks L1-sized
    K-blocks (several per row here: 192 channels, ~58 entries per row), as the Fire's layers do;
    odd map sizes, batch 2, 20 rows (no whole quads at the end)."""
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        L = make_layer(20, 192, 0.3, 6, seed=3)
        for H, W in ((23, 23), (13, 13), (9, 40)):
            x = torch.randn(2, 192, H, W).contiguous(memory_format=torch.channels_last)
            _poison((2, 20, H, W), torch.float32)
            _close(co.codebook_conv2d(x, *args(L), 1, 1, 0, True),
                   _conv_ref(x, L, 192, (1, 1), 1, 0, True))
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_conv2d_channels_last_squeeze_of_a_wide_map_in_short_bands(threads):
    """A squeeze-like layer over a channels_last x of >= 32 columns runs in bands of <= 96 KB of
    packed channels (>= 160 pixels): many bands, each transposed and consumed alone. All channels
    packed (unstructured) or only the used ones (block-pruned at 10 %: the gathers); widths that
    leave a partial last vector per band; a pixel stride > C (a channel slice of a wider x)."""
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for quads, density in ((False, 0.3), (True, 0.1)):
            L = make_layer(16, 120, density, 6, seed=5, quads=quads)
            for H, W in ((19, 55), (7, 37)):
                wide = torch.randn(2, 136, H, W).contiguous(memory_format=torch.channels_last)
                for x in (wide[:, :120], wide[:, 16:].contiguous(memory_format=torch.channels_last)):
                    _poison((2, 16, H, W), torch.float32)
                    _close(co.codebook_conv2d(x, *args(L), 1, 1, 0, True),
                           _conv_ref(x, L, 120, (1, 1), 1, 0, True))
    finally:
        torch.set_num_threads(n)


def test_conv2d_large_batch_threads():
    C, O = 16, 32
    L = make_layer(O, C * 9, 0.33, 6)
    x = torch.randn(9, C, 12, 12)
    n = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            _close(co.codebook_conv2d(x, *args(L), 3, 1, 1, True), _conv_ref(x, L, C, (3, 3), 1, 1, True))
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("quads", [False, True])
def test_conv2d_classifier_shaped_threads(quads):
    # 512 channels on a 13 x 13 map, more rows than channels (SqueezeNet's classifier): the packed
    # map is over the band budget, so NCHW runs it as one band split by output channels (no quads)
    # or as two bands (quads), channels_last always in bands; batch 3 and 1-3 threads change the
    # split again. Conv and conv + mean.
    C, O = 512, 516
    L = make_layer(O, C, 0.33, 6, seed=5, quads=quads)
    n = torch.get_num_threads()
    try:
        for t, batch, cl in ((1, 1, False), (2, 1, False), (3, 1, True), (2, 3, False), (2, 1, True)):
            torch.set_num_threads(t)
            x = torch.relu(torch.randn(batch, C, 13, 13))
            if cl:
                x = x.to(memory_format=torch.channels_last)
            ref = _conv_ref(x, L, C, (1, 1), 1, 0, True)
            _poison((batch, O, 13, 13), torch.float32)
            _close(co.codebook_conv2d(x, *args(L), 1, 1, 0, True), ref)
            mean = co.codebook_conv2d_global_avg_pool(x, *args(L), 1, 1, 0, True)
            _close(mean, ref.mean((2, 3), keepdim=True))
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("quads", [False, True])
def test_channels_last_output_row_blocks(quads):
    # A channels-last output leaves the rows kernel's tiles raw and transposes them out 16 rows at
    # a time, blocks ending at multiples of 16: 45 / 70 rows (a short last block), 1-3 threads (45
    # rows on 2 threads split output channels at row 23, mid-block), quads and single rows, 1x1
    # (flat) and 3x3 layouts.
    n = torch.get_num_threads()
    try:
        for t, (C, O, k, p, H) in itertools.product((1, 2, 3), ((24, 45, 1, 0, 13), (8, 70, 3, 1, 20))):
            torch.set_num_threads(t)
            L = make_layer(O, C * k * k, 0.4, 6, seed=O + t, quads=quads)
            x = torch.randn(1, C, H, H).to(memory_format=torch.channels_last)
            _poison((1, O, H, H), torch.float32)
            y = co.codebook_conv2d(x, *args(L), k, 1, p, True)
            assert y.is_contiguous(memory_format=torch.channels_last)
            _close(y, _conv_ref(x, L, C, (k, k), 1, p, True))
    finally:
        torch.set_num_threads(n)


def test_float64():
    C, O = 6, 7
    L = make_layer(O, C * 9, 0.5, 5, dtype=torch.float64)
    x = torch.randn(2, C, 6, 5, dtype=torch.float64)
    y = co.codebook_conv2d(x, *args(L), 3, 1, 1, True)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, _conv_ref(x, L, C, (3, 3), 1, 1, True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hw", [(9, 9), (16, 16), (13, 13)])
def test_conv2d_fillers_at_every_place_of_an_eight_entry_group(hw, isa):
    """Whole rows in tiles of >= 5 vectors walk 8 entries per step (gaps and codes as 8-byte
    loads) and leave a group with a filler to the entry-by-entry loop: rows of 0-40 entries with a
    filler at each place of a group, two fillers in one group, and rows ending in a partial group,
    against the float64 reference."""
    C = 300  # 1x1 conv: K = 300 > 255, so a filler fits in a row
    gen = torch.Generator().manual_seed(11)
    rows = []
    for r in range(40):
        n = r  # entries of this row, fillers included
        gaps = torch.randint(0, 4, (n,), generator=gen).tolist()
        if n:
            gaps[r % 8 if r % 8 < n else n - 1] = 255  # one filler, at place r % 8 of its group
        if r % 5 == 0 and n > 12:
            gaps[9], gaps[10] = 255, 255  # two in one group (places 1 and 2 of the second)
        # keep the last cursor < K: shrink gaps until it fits
        while -1 + sum(255 if g == 255 else g + 1 for g in gaps) >= C:
            i = max(range(n), key=lambda k: -1 if gaps[k] == 255 else gaps[k])
            if gaps[i] in (0, 255):
                gaps[[k for k in range(n) if gaps[k] == 255][-1]] = 0
            else:
                gaps[i] -= 1
        rows.append(gaps)
    check_1x1_stream(rows, C, hw, 16, gen, min_fillers=20)


def check_1x1_stream(rows, C, hw, ncodes, gen, min_fillers):
    """A 1x1 conv (relu) on a stream built from per-row gap lists (255 = filler) with random codes
    < ncodes, codebook and bias, against the float64 reference, NCHW and channels_last."""
    gaps = torch.tensor([g for r in rows for g in r], dtype=torch.uint8)
    counts = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    codes = torch.randint(0, ncodes, (len(gaps),), dtype=torch.uint8, generator=gen)
    cb = torch.randn(ncodes, generator=gen)
    bias = torch.randn(len(rows), generator=gen)
    assert (gaps == 255).sum() > min_fillers
    w = co.codebook_decode(cb.double(), codes, gaps, counts, C)
    x = torch.randn(1, C, *hw, generator=gen)
    ref = F.relu(F.conv2d(x.double(), w.reshape(len(rows), C, 1, 1), bias.double()))
    for fmt in (torch.contiguous_format, torch.channels_last):
        y = co.codebook_conv2d(x.contiguous(memory_format=fmt), cb, codes, gaps, counts, bias, 1, 1,
                               0, True)
        _close(y, ref)


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 700), (5, 700), (40, 700), (2, 3, 700), (700,)])
@pytest.mark.parametrize("density", [1.0, 0.33, 0.1, 0.0])
def test_linear_matches_reference(shape, density, isa):
    L = make_layer(30, 700, density, 5, force_fillers=True, seed=len(shape))
    x = torch.randn(*shape)
    for relu in (False, True):
        y = co.codebook_linear(x, *args(L), relu=relu)
        ref = x.double() @ L["dense"].T + L["bias"].double()
        if relu:
            ref = F.relu(ref)
        assert y.shape == (*shape[:-1], 30)
        _close(y, ref)


# ---------------------------------------------------------------------------------------------
# fused Fire
# ---------------------------------------------------------------------------------------------
def _fire_layers(C, S, E1, E3, density, bits=6, dtype=torch.float32, bias=True, seed=0):
    return (make_layer(S, C, density, bits, dtype, seed=seed + 1, bias=bias),
            make_layer(E1, S, density, bits, dtype, seed=seed + 2, bias=bias),
            make_layer(E3, 9 * S, density, bits, dtype, seed=seed + 3, bias=bias, force_fillers=True))


def _fire_ref(x, layers):
    return co.codebook_fire_reference(
        x.double(), *[(l["codebook"].double(), l["codes"], l["gaps"], l["row_counts"],
                       l["bias"].double() if l["bias"] is not None else None) for l in layers])


FIRE_CASES = [
    (96, 16, 64, 64, 13, 13),   # SqueezeNet 1.0 fire2 shape on a 13x13 map
    (64, 16, 64, 64, 27, 27),
    (512, 64, 256, 256, 13, 13),  # SqueezeNet fire9
    (37, 7, 5, 11, 1, 9),       # 1xN, prime channel counts
    (12, 5, 3, 4, 17, 3),
    (8, 3, 2, 2, 1, 1),         # 1x1 map
    (64, 32, 16, 48, 6, 40),    # K(e3) = 288 > 255: fillers
]


@pytest.mark.parametrize("case", FIRE_CASES, ids=lambda c: "_".join(map(str, c)))
@pytest.mark.parametrize("density", [1.0, 0.33, 0.1, 0.0])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_fire_matches_reference(case, density, channels_last, isa):
    C, S, E1, E3, H, W = case
    layers = _fire_layers(C, S, E1, E3, density, seed=C)
    x = torch.randn(2, C, H, W)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _poison((2, E1 + E3, H, W), torch.float32)
    y = co.codebook_fused_fire(x, *args(layers[0]), *args(layers[1]), *args(layers[2]))
    assert y.shape == (2, E1 + E3, H, W)
    if channels_last and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    _close(y, _fire_ref(x, layers))


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_fire_squeeze_reads_x_in_place(threads):
    """With NCHW rows of W >= 8 pixels the squeeze reads x itself: a band's rows are one flat run
    per channel whose vectors straddle row ends (W = 16, 17, 27, 40: two rows; W = 8, 11, 13: up to
    three), the run rounded up to 16
    pixels; a band whose rounded run would read past the end of x's storage is packed instead
    (the last band of a contiguous x), while views of a larger tensor (rows or channels cut from
    it) read in place up to their last band. Batch 2: a run may read into the next image."""
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for C, S, E1, E3, H, W in ((24, 6, 8, 8, 9, 16), (20, 5, 4, 6, 7, 17), (16, 8, 8, 8, 11, 27),
                                   (12, 4, 3, 5, 5, 40), (20, 6, 5, 7, 13, 13), (9, 4, 3, 3, 10, 8),
                                   (10, 3, 4, 4, 6, 11)):
            layers = _fire_layers(C, S, E1, E3, 0.4, seed=W)
            big = torch.randn(2, C + 3, H + 3, W)
            for x in (torch.randn(2, C, H, W), big[:, 1:1 + C, 1:1 + H], big[:, :C, 2:2 + H]):
                _poison((2, E1 + E3, H, W), torch.float32)
                y = co.codebook_fused_fire(x, *args(layers[0]), *args(layers[1]), *args(layers[2]))
                _close(y, _fire_ref(x, layers))
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("op", ["fire", "conv"])
def test_in_place_squeeze_stays_inside_x(op):
    """x placed right before an inaccessible page (mmap + mprotect, in a subprocess): the in-place
    squeeze (of the Fire, and of a standalone squeeze-like 1x1 conv) rounds each band's run up to
    16 pixels, so the band that would read past the end of x's storage must be packed instead;
    reading a single float past x faults. W = 17 (rows straddle vectors), 1 and 2 threads, batch 2
    (the second image's last band)."""
    code = textwrap.dedent(f"""
        import ctypes, mmap, sys
        import torch
        import torch.nn.functional as F
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from sqz_kernels import codebook_ops as co
        from codebook_helpers import args, make_layer
        fire = {op == "fire"!r}
        # the conv's map has >= 256 pixels and O <= C: the sizes that read x in place
        N, C, S, E1, E3, H, W = (2, 8, 4, 4, 5, 9, 17) if fire else (2, 24, 6, 0, 0, 17, 17)
        n = N * C * H * W
        page = mmap.PAGESIZE
        total = -(-n * 4 // page) * page + page
        mm = mmap.mmap(-1, total)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        libc = ctypes.CDLL(None)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(base + total - page, page, 0) == 0
        x = torch.frombuffer(mm, dtype=torch.float32, count=n, offset=total - page - 4 * n)
        x = x.view(N, C, H, W)
        x.copy_(torch.randn(N, C, H, W))
        if fire:
            layers = [make_layer(S, C, 0.5, 6, seed=1), make_layer(E1, S, 0.5, 6, seed=2),
                      make_layer(E3, 9 * S, 0.5, 6, seed=3)]
            ref = co.codebook_fire_reference(x.double(), *[(L["codebook"].double(), L["codes"],
                                             L["gaps"], L["row_counts"], L["bias"].double())
                                             for L in layers])
            run = lambda: co.codebook_fused_fire(x, *args(layers[0]), *args(layers[1]),
                                                 *args(layers[2]))
        else:
            L = make_layer(S, C, 0.3, 6, seed=1)
            ref = F.relu(F.conv2d(x.double(), L["dense"].reshape(S, C, 1, 1), L["bias"].double()))
            run = lambda: co.codebook_conv2d(x, *args(L), 1, 1, 0, True)
        for t in (1, 2):
            torch.set_num_threads(t)
            y = run()
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stderr[-2000:])


def test_fused_fire_no_bias_threads_noncontiguous():
    layers = _fire_layers(20, 6, 7, 9, 0.33, bias=False)
    x = torch.randn(5, 40, 11, 9)[:, ::2]
    n = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            y = co.codebook_fused_fire(x, *args(layers[0]), *args(layers[1]), *args(layers[2]))
            _close(y, _fire_ref(x, layers))
    finally:
        torch.set_num_threads(n)
    assert co.codebook_fused_fire(x[:0], *args(layers[0]), *args(layers[1]), *args(layers[2])).shape == (0, 16, 11, 9)


@pytest.mark.parametrize("band_bytes", ["1", "30000", "100000000"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_fire_band_sizes(band_bytes, threads, monkeypatch):
    """Bands of one row (every band but a thread's first takes the two squeeze rows it shares with
    the previous band from the squeeze buffer), a few rows, one band per image; 3 threads on one
    image split output channels of one band (the squeeze is reused across them). Two images: a
    band must not reuse squeeze rows of the other image."""
    monkeypatch.setenv("SQZ_FIRE_BAND_BYTES", band_bytes)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        # (the third map fits one pixel tile, so a large budget makes it one band per image; the
        # others' bands are capped at one tile's rows)
        for C, S, E1, E3, H, W, N in ((20, 6, 8, 8, 23, 21, 2), (12, 5, 3, 4, 9, 35, 1),
                                      (20, 6, 8, 8, 11, 9, 2)):
            layers = _fire_layers(C, S, E1, E3, 0.4, seed=H)
            for cl in (False, True):
                x = torch.randn(N, C, H, W)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                _poison((N, E1 + E3, H, W), torch.float32)
                y = co.codebook_fused_fire(x, *args(layers[0]), *args(layers[1]), *args(layers[2]))
                _close(y, _fire_ref(x, layers))
    finally:
        torch.set_num_threads(n)


def test_scratch_is_not_assumed_zero():
    """The per-call scratch (packed input band, Fire squeeze buffer) is not zero-initialised: the
    kernels must write every element they read. A first call on an all-NaN input leaves NaN in
    the freed scratch, which the next call's allocations get back (one thread: one arena); any
    element read without being written makes the second result NaN."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for C, O, k, s, p, H, W in CONV_CASES[:5] + CONV_CASES[10:]:
            L = make_layer(O, C * k[0] * k[1], 0.33, 6, seed=O)
            for x in (torch.full((1, C, H, W), float("nan")), torch.randn(1, C, H, W)):
                y = co.codebook_conv2d(x, *args(L), k, s, p, True)
            _close(y, _conv_ref(x, L, C, k, s, p, True))
        for C, S, E1, E3, H, W in FIRE_CASES:
            layers = _fire_layers(C, S, E1, E3, 0.33, seed=C)
            fargs = [a for L in layers for a in args(L)]
            for x in (torch.full((1, C, H, W), float("nan")), torch.randn(1, C, H, W)):
                y = co.codebook_fused_fire(x, *fargs)
            _close(y, _fire_ref(x, layers))
    finally:
        torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# bad inputs -> RuntimeError naming the argument
# ---------------------------------------------------------------------------------------------
def _good():
    L = make_layer(4, 8 * 9, 0.5, 3)
    return torch.randn(1, 8, 5, 5), L


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(codes=a["codes"].clone().fill_(200)), "codes"),
    (lambda a: a.update(row_counts=a["row_counts"] + 1), "row_counts sum"),
    (lambda a: a.update(row_counts=torch.tensor([-1, 0, 0, a["codes"].numel() + 1], dtype=torch.int32)), "negative"),
    (lambda a: a.update(gaps=torch.full_like(a["gaps"], 254)), "gaps run past"),
    (lambda a: a.update(codes=a["codes"].to(torch.int32)), "codes must be a 1-D uint8"),
    (lambda a: a.update(gaps=a["gaps"].to(torch.int64)), "gaps must be a 1-D uint8"),
    (lambda a: a.update(row_counts=a["row_counts"].to(torch.int64)), "row_counts must be a 1-D int32"),
    (lambda a: a.update(gaps=a["gaps"][:-1]), "equal length"),
    (lambda a: a.update(codebook=a["codebook"].double()), "codebook has dtype"),
    (lambda a: a.update(codebook=torch.randn(300)), "1..256"),
    (lambda a: a.update(bias=torch.randn(5)), "bias must have shape"),
])
def test_bad_inputs(mutate, match):
    x, L = _good()
    a = dict(L)
    mutate(a)
    with pytest.raises(RuntimeError, match=match):
        co.codebook_conv2d(x, a["codebook"], a["codes"], a["gaps"], a["row_counts"], a["bias"], 3, 1, 1, True)


def _stream(rows, K):
    """A linear layer's stream from per-row lists of gaps (255 = filler); codes 1, codebook [0, 1]."""
    gaps = torch.tensor([g for r in rows for g in r], dtype=torch.uint8)
    counts = torch.tensor([len(r) for r in rows], dtype=torch.int32)
    return dict(codebook=torch.tensor([0.0, 1.0]), codes=torch.ones(len(gaps), dtype=torch.uint8),
                gaps=gaps, row_counts=counts, bias=None, K=K)


def _run_linear(a):
    x = torch.ones(1, a["K"])
    return co.codebook_linear(x, a["codebook"], a["codes"], a["gaps"], a["row_counts"], a["bias"])


@pytest.mark.parametrize("length", [0, 1, 2, 15, 16, 17, 63, 64, 65, 130])
def test_validation_at_the_bounds(length, isa):
    """Every ISA's validation pass (the AVX-512 one checks a row of <= 16 entries in one 128-bit
    step, longer rows 64 entries per step) accepts rows whose last cursor is K - 1 and rejects
    them at K - 1 = K' (one position too few), for rows around both steps, with a filler; finds a
    bad code inside a long row and ignores a filler's."""
    if length >= 2:  # a filler (cursor 254), zeros, then a gap that ends the row at K - 1
        K = 300 + length
        row = [255] + [0] * (length - 2) + [K - 254 - length]
    else:
        K = 100
        row = [99] * length
    assert -1 + sum(255 if g == 255 else g + 1 for g in row) == (K - 1 if length else -1)
    rows = [row, [0], [], row]
    y = _run_linear(_stream(rows, K))
    assert y.tolist() == [[float(sum(g != 255 for g in r)) for r in rows]]
    if length:
        with pytest.raises(RuntimeError, match="gaps run past the end of row 0"):
            _run_linear(_stream(rows, K - 1))
        a = _stream(rows, K)
        i = len(row) + 1 + length // 2  # an entry of the last row (not a filler)
        a["codes"][i] = 2
        with pytest.raises(RuntimeError, match=rf"codes\[{i}\] = 2 is out of range"):
            _run_linear(a)
        if length >= 2:
            a = _stream(rows, K)
            a["codes"][len(row) + 1] = 7  # the last row's filler: its code is never read
            _run_linear(a)


def test_bad_geometry_and_fire_names():
    x, L = _good()
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        co.codebook_conv2d(x[0], *args(L), 3, 1, 1, True)
    with pytest.raises(RuntimeError, match="gaps run past"):  # K = 8 for a 1x1 conv on 8 channels
        co.codebook_conv2d(x, *args(L), 1, 1, 0, True)
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        co.codebook_conv2d(x, *args(L), 7, 1, 0, True)
    with pytest.raises(RuntimeError, match="stride"):
        co.codebook_conv2d(x, *args(L), 3, 0, 1, True)
    with pytest.raises(ValueError, match="dilation"):
        co.codebook_conv2d(x, *args(L), 3, 1, 1, True, dilation=2)
    with pytest.raises(ValueError, match="groups"):
        co.codebook_conv2d(x, *args(L), 3, 1, 1, True, groups=2)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        co.codebook_conv2d(x.half(), *args(L), 3, 1, 1, True)
    layers = _fire_layers(8, 4, 3, 3, 0.5)
    bad = dict(layers[2])
    bad["codes"] = bad["codes"].clone().fill_(99)
    with pytest.raises(RuntimeError, match="e3_codes"):
        co.codebook_fused_fire(x, *args(layers[0]), *args(layers[1]), *args(bad))
    with pytest.raises(RuntimeError, match="e1_gaps run past"):  # e1 rows built for K = 4 read as K = 4 -> ok; use sq stream as e1
        co.codebook_fused_fire(x, *args(layers[0]), *args(layers[2]), *args(layers[2]))
    with pytest.raises(RuntimeError, match="sq_row_counts"):
        co.codebook_fused_fire(x, layers[0]["codebook"], layers[0]["codes"], layers[0]["gaps"],
                               layers[0]["row_counts"].long(), None, *args(layers[1]), *args(layers[2]))
    with pytest.raises(RuntimeError, match="codebook_linear: codes"):
        co.codebook_linear(torch.randn(2, 72), L["codebook"], L["codes"].clone().fill_(9),
                           L["gaps"], L["row_counts"], None)


def test_inputs_beyond_32_bit_offsets_are_refused():
    """The kernels address a packed band with int32 offsets; a band of >= 2^31 elements (here 2^20
    channels x one 2048-pixel row, as an expanded x that costs no memory) is a clear error in every
    op, not an overflowed offset."""
    C = 1 << 20
    empty = torch.zeros(0, dtype=torch.uint8)

    def layer(rows):  # rows without entries: validation passes, the geometry check decides
        return torch.tensor([0.5]), empty, empty, torch.zeros(rows, dtype=torch.int32), None

    def wide(rows):
        return torch.zeros(1, 1, rows, 2048).expand(1, C, rows, 2048)

    calls = {
        "codebook_conv2d": lambda: co.codebook_conv2d(wide(1), *layer(4), 1, 1, 0, False),
        "codebook_conv2d 3x3": lambda: co.codebook_conv2d(wide(1), *layer(4), 3, 1, 1, False),
        "codebook_conv2d_max_pool": lambda: co.codebook_conv2d_max_pool(
            wide(2), *layer(4), 1, 1, 0, True, 2, 2),
        "codebook_conv2d_global_avg_pool": lambda: co.codebook_conv2d_global_avg_pool(
            wide(1), *layer(4), 1, 1, 0, True),
        "codebook_fused_fire": lambda: co.codebook_fused_fire(
            wide(1), *layer(1), *layer(1), *layer(1)),
        "codebook_fused_fire_max_pool": lambda: co.codebook_fused_fire_max_pool(
            wide(3), *layer(1), *layer(1), *layer(1), 3, 2, False),
        "codebook_linear": lambda: co.codebook_linear(torch.zeros(1, C).expand(2048, C), *layer(4)),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=f"{name.split()[0]}: input too large for 32-bit"):
            call()


# ---------------------------------------------------------------------------------------------
# no dense float weight during forward: peak memory bound on a layer whose dense weight is 256 MB
# ---------------------------------------------------------------------------------------------
def test_no_dense_weight_is_allocated():
    code = textwrap.dedent("""
        import resource, torch, sqz_kernels
        from sqz_kernels import codebook_ops as co
        torch.set_num_threads(1)
        O = K = 8192  # dense fp32 weight: 256 MB; stored: 4 entries per row
        g = torch.Generator().manual_seed(0)
        gaps = torch.randint(0, 200, (O * 4,), dtype=torch.uint8, generator=g)
        codes = torch.randint(0, 64, (O * 4,), dtype=torch.uint8, generator=g)
        counts = torch.full((O,), 4, dtype=torch.int32)
        cb = torch.randn(64)
        x = torch.randn(1, K, 2, 2)
        xl = torch.randn(3, K)
        with torch.no_grad():
            co.codebook_conv2d(x, cb, codes, gaps, counts, None, 1, 1, 0, False)  # warm up
            co.codebook_linear(xl, cb, codes, gaps, counts, None)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for _ in range(3):
                y = co.codebook_conv2d(x, cb, codes, gaps, counts, None, 1, 1, 0, True)
                z = co.codebook_linear(xl, cb, codes, gaps, counts, None)
                p = co.codebook_conv2d_max_pool(x, cb, codes, gaps, counts, None, 1, 1, 0, True, 2, 2)
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024)
    """)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    grew_mb = int(out.stdout.strip().splitlines()[-1])
    assert grew_mb < 32, f"peak RSS grew by {grew_mb} MB during forward (a dense weight is 256 MB)"


# ---------------------------------------------------------------------------------------------
# opcheck, gradcheck, torch.compile
# ---------------------------------------------------------------------------------------------
def test_opcheck_conv2d():
    C, O = 5, 6
    L = make_layer(O, C * 9, 0.5, 4)
    for relu, bias in ((True, L["bias"]), (False, None)):
        x = torch.randn(2, C, 7, 6, requires_grad=True)
        cb = L["codebook"].clone().requires_grad_()
        b = bias.clone().requires_grad_() if bias is not None else None
        torch.library.opcheck(torch.ops.sqz_kernels.codebook_conv2d,
                              (x, cb, L["codes"], L["gaps"], L["row_counts"], b, [3, 3], [2, 2], [1, 1], relu))
    xcl = torch.randn(2, C, 7, 6).to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.sqz_kernels.codebook_conv2d,
                          (xcl, L["codebook"], L["codes"], L["gaps"], L["row_counts"], None, [3, 3], [1, 1], [1, 1], True))


def test_opcheck_linear_and_fire():
    L = make_layer(6, 20, 0.5, 4)
    x = torch.randn(3, 20, requires_grad=True)
    torch.library.opcheck(torch.ops.sqz_kernels.codebook_linear,
                          (x, L["codebook"].clone().requires_grad_(), L["codes"], L["gaps"], L["row_counts"],
                           L["bias"].clone().requires_grad_(), True))
    layers = _fire_layers(6, 4, 3, 5, 0.5)
    flat = []
    for l in layers:
        flat += [l["codebook"].clone().requires_grad_(), l["codes"], l["gaps"], l["row_counts"],
                 l["bias"].clone().requires_grad_()]
    x = torch.randn(2, 6, 5, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.sqz_kernels.codebook_fused_fire, (x, *flat))


def _dbl(l):
    return (l["codebook"].double().requires_grad_(), l["codes"], l["gaps"], l["row_counts"],
            l["bias"].double().requires_grad_())


def test_gradcheck_conv2d_and_linear():
    C, O = 4, 5
    L = make_layer(O, C * 9, 0.5, 3, dtype=torch.float64)
    x = torch.randn(2, C, 6, 5, dtype=torch.float64, requires_grad=True)
    cb, codes, gaps, counts, b = _dbl(L)
    assert torch.autograd.gradcheck(
        lambda x, cb, b: co.codebook_conv2d(x, cb, codes, gaps, counts, b, 3, 2, 1, False), (x, cb, b))
    L = make_layer(6, 300, 0.1, 3, dtype=torch.float64, force_fillers=True)
    x = torch.randn(3, 300, dtype=torch.float64, requires_grad=True)
    cb, codes, gaps, counts, b = _dbl(L)
    assert torch.autograd.gradcheck(
        lambda x, cb, b: co.codebook_linear(x, cb, codes, gaps, counts, b), (x, cb, b))


def test_gradcheck_fire():
    layers = _fire_layers(5, 3, 2, 4, 0.6, dtype=torch.float64)
    sq, e1, e3 = (_dbl(l) for l in layers)
    x = torch.randn(1, 5, 4, 3, dtype=torch.float64, requires_grad=True)

    def f(x, a, b, c, d, e, g):
        return co.codebook_fused_fire(x, a, *sq[1:4], b, c, *e1[1:4], d, e, *e3[1:4], g)

    assert torch.autograd.gradcheck(f, (x, sq[0], sq[4], e1[0], e1[4], e3[0], e3[4]))


def test_grad_codebook_is_grouped_weight_gradient():
    # dL/dC_k == sum of dL/dW over the positions whose code is k (compared with autograd through
    # the decoded dense weight)
    C, O = 6, 8
    L = make_layer(O, C * 9, 0.4, 3, dtype=torch.float64)
    x = torch.randn(2, C, 5, 5, dtype=torch.float64)
    cb = L["codebook"].clone().requires_grad_()
    co.codebook_conv2d(x, cb, L["codes"], L["gaps"], L["row_counts"], None, 3, 1, 1, True).square().sum().backward()
    cb2 = L["codebook"].clone().requires_grad_()
    w = co.codebook_decode(cb2, L["codes"], L["gaps"], L["row_counts"], C * 9).reshape(O, C, 3, 3)
    F.relu(F.conv2d(x, w, padding=1)).square().sum().backward()
    torch.testing.assert_close(cb.grad, cb2.grad)


def test_torch_compile_fullgraph():
    C, O = 8, 12
    L = make_layer(O, C * 9, 0.33, 6)
    layers = _fire_layers(O, 4, 6, 6, 0.33)
    head = make_layer(5, 10 * 3 * 3, 0.5, 4)

    def net(x):
        y = co.codebook_conv2d(x, *args(L), 3, 2, 1, True)
        y = co.codebook_fused_fire(y, *args(layers[0]), *args(layers[1]), *args(layers[2]))
        return co.codebook_linear(y[:, :10].flatten(1)[:, :90], *args(head), relu=False)

    x = torch.randn(2, C, 11, 11)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), net(x))


def test_matches_compression_package_encoder():
    # The resident format is a contract with sqz_kernels.compression (issue 4): streams encoded by
    # its encoder run through these kernels equal its own reference decode.
    resident = pytest.importorskip("sqz_kernels.compression.resident")
    g = torch.Generator().manual_seed(5)
    O, C = 24, 40
    mask = torch.rand(O, C * 9, generator=g) < 0.2
    mask[3] = False
    mask[4, :] = False
    mask[4, -1] = True  # a run of 359 zeros: fillers
    codes2d = torch.randint(0, 64, (O, C * 9), generator=g)
    codes, gaps, counts = resident.encode_rows(mask, codes2d)
    cb = torch.randn(64, generator=g)
    w = resident.decode_dense(cb.double(), codes, gaps, counts, (O, C, 3, 3))
    x = torch.randn(2, C, 9, 9, generator=g)
    y = co.codebook_conv2d(x, cb, codes, gaps, counts, None, 3, 2, 1, False)
    _close(y, F.conv2d(x.double(), w, stride=2, padding=1))
    torch.testing.assert_close(co.codebook_decode(cb.double(), codes, gaps, counts, C * 9), w.reshape(O, -1))


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_fire_fewer_images_than_threads(channels_last, cpu_isa):
    """Fewer images than threads: images are split into bands, and maps with fewer rows than
    threads also into output-channel blocks of equal entry counts that cut through expand1x1,
    expand3x3 or their boundary (uneven splits: 3, 4 threads)."""
    layers = _fire_layers(37, 10, 21, 19, 0.33)
    n = torch.get_num_threads()
    try:
        for t, H in itertools.product((2, 3, 4), (13, 2, 1)):
            torch.set_num_threads(t)
            for batch in range(1, t):
                x = torch.randn(batch, 37, H, 11)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = co.codebook_fused_fire(x, *args(layers[0]), *args(layers[1]), *args(layers[2]))
                _close(y, _fire_ref(x, layers))
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_extreme_geometry_is_computed_or_refused_cleanly(fmt):
    # Found by a review: a stride of 2^60 wrapped the band layout's size (a segfault), 2^26..2^58
    # were refused as "too large", 2^22 took 370 MB; C * kh * kw of 2^64 wrapped the address
    # table's size to 0; 2 * padding of 2^63 - 1 wrapped to -2 (a wrong output shape).
    x = torch.randn(2, 8, 5, 6)
    if fmt == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    L = make_layer(4, 8 * 9, 0.5, 3)
    for s in ((2 ** 60, 1), (1, 2 ** 22), (2 ** 30, 2 ** 62), (3, 4)):
        torch.testing.assert_close(co.codebook_conv2d(x, *args(L), 3, s, 1, False),
                                   _conv_ref(x, L, 8, (3, 3), s, (1, 1), False).float(),
                                   rtol=1e-5, atol=1e-5)
        conv = _conv_ref(x, L, 8, (3, 3), s, (1, 1), True)
        for ps, ceil in ((2 ** 24, False), (2 ** 63 - 1, True), (2 ** 62, False)):
            # (2^63 - 1 with ceil_mode: `span + s - 1` wrapped, a SIGFPE in the band arithmetic)
            pooled = co.codebook_conv2d_max_pool(x, *args(L), 3, s, 1, True, 1, ps, ceil)
            ref = F.max_pool2d(conv, 1, min(ps, 2 ** 30), ceil_mode=ceil)  # the same one window
            torch.testing.assert_close(pooled, ref.float(), rtol=1e-5, atol=1e-5)
    e = torch.zeros(0, dtype=torch.uint8)
    empty = (torch.ones(1), e, e, torch.zeros(1, dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match="< 2\\^31"):
        co.codebook_conv2d(x[:, :1], *empty, 2 ** 32, 1, 2 ** 31, False)
    with pytest.raises(RuntimeError, match="32-bit address offsets"):  # 2^40 channels x 3 x 3
        co.codebook_conv2d(x[:1, :1].expand(1, 2 ** 40, 5, 6), *empty, 3, 1, 1, False)
    for p in ((2 ** 63 - 1, 0), (0, 2 ** 63 - 1)):
        with pytest.raises(RuntimeError, match="< 2\\^31"):
            co.codebook_conv2d(x, *empty, 1, 1, p, False)
