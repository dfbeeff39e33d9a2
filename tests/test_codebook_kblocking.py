"""The K-blocked path of the sparse-codebook kernels: rows are walked block of input channels by
block, each row resuming where its walk stopped, partial tiles accumulating across blocks. Layers with
very many channels block by default; SQZ_KBLOCK_BYTES / SQZ_KBLOCK_MIN_ENTRIES force tiny blocks so
that every block boundary (fillers that cross it, empty blocks, rows that end early) is exercised."""
import pytest
import torch
import torch.nn.functional as F

from sqz_kernels import codebook_ops as co

from codebook_helpers import args, make_layer

CONVS = [  # (C, O, k, stride, pad, H, density, force_fillers)
    (160, 24, 1, 1, 0, 24, 0.33, False),
    (600, 20, 1, 1, 0, 40, 0.33, True),
    (128, 10, 3, 1, 1, 30, 0.05, True),
    (1100, 6, 1, 1, 0, 32, 0.2, True),
]
FIRES = [(256, 32, 64, 64, 40), (700, 24, 16, 16, 24)]


def _cast(layer, dt):
    return [t.to(dt) if t is not None and t.is_floating_point() else t for t in args(layer)]


def _check_conv(case, channels_last, bits, seed):
    c, o, k, s, p, h, density, fillers = case
    layer = make_layer(o, c * k * k, density, bits=bits, seed=seed, force_fillers=fillers)
    x = torch.randn(2, c, h, h)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = co.codebook_conv2d(x, *_cast(layer, torch.float32), k, s, p, True)
    w = layer["dense"].double().reshape(o, c, k, k)
    ref = F.relu(F.conv2d(x.double(), w, layer["bias"].double(), s, p))
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", CONVS, ids=str)
def test_blocked_conv(case, channels_last, cpu_isa):
    _check_conv(case, channels_last, bits=6, seed=case[0])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", FIRES, ids=str)
def test_blocked_fire(shape, channels_last):
    c, s, e1, e3, h = shape
    layers = [make_layer(s, c, 0.33, 6, seed=1, force_fillers=c > 255), make_layer(e1, s, 0.33, 6, seed=2),
              make_layer(e3, 9 * s, 0.33, 6, seed=3)]
    x = torch.randn(1, c, h, h)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    st = [_cast(L, torch.float32) for L in layers]
    y = co.codebook_fused_fire(x, *st[0], *st[1], *st[2])
    ref = co.codebook_fire_reference(x.double(), *[_cast(L, torch.float64) for L in layers])
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


TINY = [  # (C, O, k, stride, pad, H, density, force_fillers)
    (300, 7, 1, 1, 0, 9, 0.05, True),
    (40, 9, 3, 1, 1, 11, 0.3, False),
    (6, 5, 7, 2, 3, 17, 0.5, False),
    (120, 4, 3, 2, 0, 13, 0.02, True),
]


@pytest.fixture
def tiny_blocks(monkeypatch):
    monkeypatch.setenv("SQZ_KBLOCK_BYTES", "1")  # one input channel per block
    monkeypatch.setenv("SQZ_KBLOCK_MIN_ENTRIES", "0")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", TINY, ids=str)
def test_one_channel_blocks_conv(case, channels_last, cpu_isa, tiny_blocks):
    _check_conv(case, channels_last, bits=5, seed=case[1])


@pytest.mark.parametrize("shape", [(270, 12, 8, 8, 10), (33, 6, 5, 7, 7)], ids=str)
def test_one_channel_blocks_fire(shape, cpu_isa, tiny_blocks):
    c, s, e1, e3, h = shape
    layers = [make_layer(s, c, 0.2, 4, seed=4, force_fillers=c > 255), make_layer(e1, s, 0.4, 4, seed=5),
              make_layer(e3, 9 * s, 0.3, 4, seed=6)]
    x = torch.randn(2, c, h, h + 3)
    y = co.codebook_fused_fire(x, *[t for L in layers for t in _cast(L, torch.float32)])
    ref = co.codebook_fire_reference(x.double(), *[_cast(L, torch.float64) for L in layers])
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_l1_blocks_by_default(channels_last, threads):
    """A conv of >= 64 rows without quads whose slab exceeds L1 is K-blocked by default into
    L1-sized blocks (chunk_channels), walked by the K-blocked rows kernel: 64 channels x 3x3 on 13x13
    (a 184 KB slab), 136 rows, a row with fillers; as a conv and as a Fire's expand3x3."""
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        _check_conv((64, 136, 3, 1, 1, 13, 0.33, True), channels_last, bits=6, seed=threads)
        test_blocked_fire((128, 64, 128, 136, 13), channels_last)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("channels_last", [False, True])
def test_one_channel_blocks_quads(channels_last, tiny_blocks):
    """Block-pruned rows (quads) under K-blocking: a layer with quads takes the generic per-row
    K-blocked path for all its rows (quads and the single rows among them)."""
    c, o, k, h = 24, 22, 3, 9
    layer = make_layer(o, c * k * k, 0.4, bits=6, seed=3, quads=True)
    x = torch.randn(1, c, h, h)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = co.codebook_conv2d(x, *_cast(layer, torch.float32), k, 1, 1, True)
    ref = F.relu(F.conv2d(x.double(), layer["dense"].double().reshape(o, c, k, k),
                          layer["bias"].double(), 1, 1))
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
