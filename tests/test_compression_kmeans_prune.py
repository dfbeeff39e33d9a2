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
