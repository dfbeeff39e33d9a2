"""k-means weight sharing and magnitude pruning."""
import pytest
import torch
from torch import nn

from sqz_kernels.compression import kmeans_1d, magnitude_mask
from sqz_kernels.compression.prune import density_schedule, prune_


@pytest.mark.parametrize("init", ["linear", "density", "random"])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_kmeans_valid_codebook(init, bits):
    x = torch.randn(20000, generator=torch.Generator().manual_seed(bits))
    cb, codes = kmeans_1d(x, bits, init)
    assert cb.dtype == torch.float32 and 1 <= cb.numel() <= 2 ** bits
    assert torch.all(cb[1:] > cb[:-1])                       # sorted, no duplicates
    assert codes.min() >= 0 and codes.max() < cb.numel()
    assert torch.bincount(codes, minlength=cb.numel()).min() > 0   # empty clusters dropped
    # every value goes to its nearest centroid
    d = (x[:, None] - cb[None, :].double()).abs()
    assert torch.all(d.gather(1, codes[:, None])[:, 0] <= d.min(1).values + 1e-6)
    # each centroid is the mean of its values (a Lloyd fixed point), up to fp32 rounding
    means = torch.zeros(cb.numel(), dtype=torch.float64).index_add_(0, codes, x.double())
    means /= torch.bincount(codes).double()
    torch.testing.assert_close(cb.double(), means, atol=2e-3, rtol=0)  # Lloyd: near a fixed point


def test_kmeans_lossless_when_few_values():
    x = torch.tensor([0.5, -1.0, 0.5, 2.0, -1.0])
    cb, codes = kmeans_1d(x, 2)
    assert torch.equal(cb[codes], x)


def test_kmeans_error_decreases_with_bits():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    errs = [float(((lambda cb, c: (cb[c] - x) ** 2)(*kmeans_1d(x, b))).mean()) for b in (2, 4, 6)]
    assert errs[0] > errs[1] > errs[2]


def test_kmeans_rejects_bad_args():
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="bits"):
            kmeans_1d(torch.randn(10), bad)
    with pytest.raises(ValueError, match="init"):
        kmeans_1d(torch.randn(10), 2, "kmeans++")
    with pytest.raises(ValueError, match="NaN"):
        kmeans_1d(torch.tensor([1.0, float("nan")] * 600), 2)


def test_magnitude_mask_exact_density_and_largest():
    w = torch.randn(64, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    m = magnitude_mask(w, 0.33)
    assert int(m.sum()) == round(0.33 * w.numel())
    assert w[m].abs().min() >= w[~m].abs().max()
    for bad in (0, 1.5, -0.1, "0.3", None):
        with pytest.raises(ValueError, match="density"):
            magnitude_mask(w, bad)


def test_iterative_schedule_never_revives_and_masks_hold_in_training():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    layers = {"0": net[0], "2": net[2]}
    seen = []

    def train_step(model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(8, 20)).pow(2).sum().backward()
            opt.step()
        seen.append({n: (l.weight != 0).clone() for n, l in layers.items()})

    masks = prune_(layers, {"0": 0.25, "2": 0.5}, schedule=3, train_step=train_step, model=net)
    assert len(seen) == 3
    for before, after in zip(seen, seen[1:]):
        for n in layers:
            assert not torch.any(after[n] & ~before[n])       # nothing revived between steps
    assert int(masks["0"].sum()) == round(0.25 * 600) and int(masks["2"].sum()) == round(0.5 * 150)
    net(torch.randn(2, 20))                                   # forward pre-hook was removed...
    assert torch.equal(layers["0"].weight != 0, masks["0"])   # ...and the weights stayed pruned


def test_density_schedule():
    s = density_schedule(0.25, 2)
    assert s == pytest.approx([0.5, 0.25])
    with pytest.raises(ValueError):
        density_schedule(0.25, 0)


def _rows_share_pattern(mask, block):
    m = mask.reshape(mask.shape[0], -1)
    for g in range(0, m.shape[0], block):
        rows = m[g:g + block]
        assert torch.equal(rows, rows[:1].expand_as(rows)), f"rows {g}..{g + len(rows) - 1} differ"


@pytest.mark.parametrize("shape", [(64, 16, 3, 3), (18, 7), (5, 3, 1, 1), (1, 9)])
def test_block_mask_shares_patterns_and_keeps_largest_blocks(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    m = magnitude_mask(w, 0.33, block=4)
    assert m.shape == w.shape and m.dtype == torch.bool
    _rows_share_pattern(m, 4)
    O, K = shape[0], w[0].numel()
    G = (O + 3) // 4
    if O > 1:
        # block scores: kept blocks have the largest L2 norms (the ragged last block holds fewer rows)
        w2 = w.reshape(O, K) ** 2
        score = torch.stack([w2[g * 4:(g + 1) * 4].sum(0) for g in range(G)])
        keep = torch.stack([m.reshape(O, K)[g * 4] for g in range(G)])
        assert int(keep.sum()) == max(1, round(0.33 * G * K))
        assert score[keep].min() >= score[~keep].max()
    assert torch.equal(magnitude_mask(w, 1.0, block=4), torch.ones_like(m))


def test_block_mask_never_revives_and_rejects_bad_block():
    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    first = magnitude_mask(w, 0.5, block=4)
    second = magnitude_mask(torch.randn(16, 8), 0.25, current=first, block=4)
    assert not torch.any(second & ~first)
    _rows_share_pattern(second, 4)
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match="block"):
            magnitude_mask(w, 0.5, block=bad)


def test_prune_block_schedule():
    torch.manual_seed(0)
    layers = {"a": nn.Conv2d(8, 12, 3), "b": nn.Linear(10, 6)}
    masks = prune_(layers, {"a": 0.3, "b": 0.5}, schedule=2, block=4)
    for n, l in layers.items():
        _rows_share_pattern(masks[n], 4)
        assert torch.equal(l.weight != 0, masks[n])
