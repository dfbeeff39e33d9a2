"""Row quads: streams whose rows 4g..4g+3 share one pattern (block-pruned layers) run the quad
kernel (one input load, four multiply-adds). Same float64 reference as every codebook test; the
streams mix shared quads with single rows (an empty row, a filler row, ragged O), and the thread
splits cut quads apart."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import sqz_kernels  # noqa: F401
from sqz_kernels import codebook_ops as co

sys.path.insert(0, os.path.dirname(__file__))
from codebook_helpers import args, make_layer  # noqa: E402
from test_codebook_kernels import (_close, _conv_ref, _fire_ref, _poison, check_1x1_stream,  # noqa: E402
                                   check_conv_case)

CONV_CASES = [
    # C, O, k, stride, pad, H, W
    (32, 128, (3, 3), (1, 1), (1, 1), 27, 27),   # SqueezeNet 1.1 fire4.expand3x3
    (64, 32, (1, 1), (1, 1), (0, 0), 13, 13),
    (3, 64, (3, 3), (2, 2), (0, 0), 45, 45),     # conv1-like, stride 2
    (48, 18, (3, 3), (1, 1), (1, 1), 13, 13),    # O % 4 == 2: a ragged last quad
    (300, 12, (1, 1), (1, 1), (0, 0), 5, 7),     # K > 255: fillers inside a shared quad
    (8, 20, (3, 3), (1, 1), (1, 1), 3, 70),      # wide rows: tiles of several chunk sizes
    (5, 9, (7, 7), (2, 2), (3, 3), 17, 17),
]


@pytest.fixture(autouse=True)
def quads_on_short_rows(monkeypatch):
    # by default only rows of >= 8 entries run as quads; the small test layers would skip some
    monkeypatch.setenv("SQZ_QUAD_MIN_ENTRIES", "1")


@pytest.fixture(params=[1, 2, 3])
def threads(request):
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"C{c[0]}O{c[1]}k{c[2][0]}s{c[3][0]}_{c[5]}x{c[6]}")
@pytest.mark.parametrize("density", [0.33, 0.1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_quads_match_reference(case, density, channels_last, threads):
    C, O, k = case[:3]
    L = make_layer(O, C * k[0] * k[1], density, bits=6, seed=O + C, force_fillers=True, quads=True)
    check_conv_case(case, L, channels_last, relus=(True,))


def test_quads_on_every_isa(cpu_isa):
    # the AVX2 / scalar kernels walk a quad stream row by row
    C, O, k, s, p, H, W = CONV_CASES[0]
    L = make_layer(O, C * 9, 0.33, bits=5, seed=3, quads=True)
    x = torch.randn(1, C, H, W)
    _close(co.codebook_conv2d(x, *args(L), k, s, p, False), _conv_ref(x, L, C, k, s, p, False))


def test_linear_quads():
    L = make_layer(1000, 512, 0.33, bits=6, seed=5, quads=True)
    x = torch.randn(3, 512)
    y = co.codebook_linear(x, *args(L), relu=True)
    ref = F.relu(F.linear(x.double(), L["dense"], L["bias"].double()))
    _close(y, ref)


FIRE_CASES = [
    (64, 16, 64, 64, 55, 55),     # SqueezeNet 1.1 fire2
    (256, 48, 192, 192, 13, 13),  # fire6
    (40, 10, 6, 14, 9, 11),       # ragged quads in every layer
    (64, 32, 16, 48, 6, 40),      # K(e3) = 288: fillers
]


@pytest.mark.parametrize("case", FIRE_CASES, ids=lambda c: "_".join(map(str, c)))
@pytest.mark.parametrize("density", [0.33, 0.1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_fire_quads_match_reference(case, density, channels_last, threads):
    C, S, E1, E3, H, W = case
    layers = (make_layer(S, C, density, 6, seed=1, quads=True),
              make_layer(E1, S, density, 6, seed=2, quads=True),
              make_layer(E3, 9 * S, density, 6, seed=3, quads=True, force_fillers=True))
    x = torch.randn(1, C, H, W)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _poison((1, E1 + E3, H, W), torch.float32)
    y = co.codebook_fused_fire(x, *args(layers[0]), *args(layers[1]), *args(layers[2]))
    _close(y, _fire_ref(x, layers))


def test_quads_off_switch_gives_the_same_result(monkeypatch):
    # SQZ_QUADS=0 (A/B measurements) runs the row kernel on the same stream
    C, O, k, s, p, H, W = CONV_CASES[0]
    L = make_layer(O, C * 9, 0.33, bits=6, seed=9, quads=True)
    x = torch.randn(1, C, H, W)
    y_on = co.codebook_conv2d(x, *args(L), k, s, p, True)
    monkeypatch.setenv("SQZ_QUADS", "0")
    y_off = co.codebook_conv2d(x, *args(L), k, s, p, True)
    torch.testing.assert_close(y_on, y_off, rtol=1e-5, atol=1e-5)


def test_default_threshold_mixes_quads_and_rows(monkeypatch):
    # the default threshold (8 entries) makes the quads of a layer with uneven rows a mix of
    # quad-kernel and row-kernel quads
    monkeypatch.delenv("SQZ_QUAD_MIN_ENTRIES")
    C, O, k, s, p, H, W = CONV_CASES[0]
    L = make_layer(O, C * 9, 0.03, bits=6, seed=4, quads=True)  # ~9 entries per row, uneven
    counts = L["row_counts"][: O // 4 * 4].reshape(-1, 4)[:, 0]
    assert (counts >= 8).any() and (counts < 8).any()
    x = torch.randn(1, C, H, W)
    _close(co.codebook_conv2d(x, *args(L), k, s, p, True), _conv_ref(x, L, C, k, s, p, True))


@pytest.mark.parametrize("channels_last", [False, True])
def test_quads_with_forced_k_blocking(channels_last, monkeypatch):
    # K-blocked layers walk rows block by block with the row kernel: quads must step aside
    monkeypatch.setenv("SQZ_KBLOCK_BYTES", "1")
    monkeypatch.setenv("SQZ_KBLOCK_MIN_ENTRIES", "0")
    C, O, k, s, p, H, W = CONV_CASES[0]
    L = make_layer(O, C * 9, 0.33, bits=6, seed=7, quads=True)
    x = torch.randn(1, C, H, W)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _close(co.codebook_conv2d(x, *args(L), k, s, p, True), _conv_ref(x, L, C, k, s, p, True))
    layers = (make_layer(16, 64, 0.33, 6, seed=1, quads=True),
              make_layer(32, 16, 0.33, 6, seed=2, quads=True),
              make_layer(32, 144, 0.33, 6, seed=3, quads=True))
    xf = torch.randn(1, 64, 9, 9)
    if channels_last:
        xf = xf.to(memory_format=torch.channels_last)
    y = co.codebook_fused_fire(xf, *args(layers[0]), *args(layers[1]), *args(layers[2]))
    _close(y, _fire_ref(xf, layers))


@pytest.mark.parametrize("hw", [(13, 13), (16, 16), (4, 20)])
def test_quad_fillers_at_every_place_of_an_eight_entry_group(hw):
    """The quad kernel walks 8 entries per step (gaps and the four rows' codes as 8-byte loads) and
    leaves a group with a filler to the entry-by-entry loop: quads of 0-38 entries with a filler at
    each place of a group (two in one group for some), against the float64 reference."""
    C = 600  # 1x1 conv: K = 600 > 2 * 255, so two fillers fit
    gen = torch.Generator().manual_seed(5)
    rows = []
    for q in range(20):
        n = 2 * q
        gaps = torch.randint(0, 3, (n,), generator=gen).tolist()
        if n:
            gaps[min(q % 8 + 8 * (q % 3), n - 1)] = 255
        if q % 4 == 1 and n > 12:
            gaps[11], gaps[12] = 255, 255
        while -1 + sum(255 if g == 255 else g + 1 for g in gaps) >= C:
            gaps[next(i for i in reversed(range(n)) if gaps[i] == 255)] = 0
        rows += [gaps] * 4  # a shared quad: four rows, one pattern
    check_1x1_stream(rows, C, hw, 32, gen, min_fillers=60)
