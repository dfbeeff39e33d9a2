"""Deep Compression accuracy on real data that ships with scikit-learn: the 8x8 digits, upscaled.

Trains SqueezeNet 1.0 (num_classes=10) from scratch (25 epochs), then compresses copies of it:
  pruning only        33 % density per layer, retrained 20 epochs with the masks held
  quantization only   6-bit codebooks on all weights, centroids fine-tuned 5 epochs
  Deep Compression    the pruned net -> 6-bit k-means -> centroid fine-tuning -> .sqz -> reload
and prints held-out accuracy and sizes. Run:  python bench/compress_digits.py [--size 32 --epochs 25]
(--block 4: prune blocks of 4 output channels together, the layout the kernels run as row quads).
"""
import argparse
import copy
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def digits_tensors(size: int, seed: int = 0):
    """(x_train, y_train, x_test, y_test): 3-channel size x size images, 80/20 stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.int64)
    i_tr, i_te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=d.target)
    return x[i_tr], y[i_tr], x[i_te], y[i_te]


def batches(x, y, bs, seed):
    """Endless shuffled mini-batches (a new permutation per epoch)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - bs + 1, bs):
            j = perm[i:i + bs]
            yield x[j], y[j]


class Loader:
    """An iterable of `steps` batches, for FineTune (which cycles it)."""

    def __init__(self, x, y, bs, steps, seed):
        self.x, self.y, self.bs, self.steps, self.seed = x, y, bs, steps, seed

    def __iter__(self):
        it = batches(self.x, self.y, self.bs, self.seed)
        return (next(it) for _ in range(self.steps))


def train(model, x, y, steps, lr, bs=64, seed=0):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    it = batches(x, y, bs, seed)
    for _ in range(steps):
        xb, yb = next(it)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        sched.step()


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


def make_model(train_init=False):
    try:
        import sqz_kernels
        m = sqz_kernels.models.squeezenet1_0(num_classes=10)
    except ImportError:  # the package needs its built extension; torchvision's net is identical
        import torchvision
        m = torchvision.models.squeezenet1_0(num_classes=10)
    if train_init:
        # SqueezeNet ends in conv -> ReLU -> average pool: with the zero bias of torchvision's
        # init, some classes' outputs die at 0 early and training from scratch stalls near 50 %
        # here; a positive start keeps all ten alive (measured: 90 % vs 48 % after 7 epochs).
        torch.nn.init.constant_(m.classifier[1].bias, 1.0)
    return m


def trained_base(size, epochs, lr, seed, cache=None, log=print):
    """The trained dense SqueezeNet (read from / written to `cache`, a .safetensors file)."""
    from safetensors.torch import load_file, save_file
    base = make_model(train_init=True)
    if cache and os.path.exists(cache):
        base.load_state_dict(load_file(cache))
        log(f"dense model read from {cache}")
        return base
    xtr, ytr, _, _ = digits_tensors(size, seed)
    t0 = time.time()
    train(base, xtr, ytr, epochs * (len(ytr) // 64), lr, 64, seed)
    log(f"trained {epochs} epochs at {size}x{size} in {time.time() - t0:.0f} s")
    if cache:
        save_file(base.state_dict(), cache)
    return base


def run(size=32, epochs=25, prune_epochs=20, ft_epochs=5, lr=2e-3, prune_lr=1e-3, ft_lr=1e-4,
        density=0.33, bits=6, seed=0, cache=None, log=print, block=1):
    from sqz_kernels import compression as C
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = digits_tensors(size, seed)
    bs = 64
    spe = len(ytr) // bs
    t0 = time.time()
    base = trained_base(size, epochs, lr, seed, cache, log)
    rows = [("dense fp32 (trained)", accuracy(base, xte, yte), None)]
    log(f"dense: {rows[0][1]:.2f} % on {len(yte)} held-out digits")

    def ft(ep, lr_):
        return C.FineTune(Loader(xtr, ytr, bs, ep * spe, seed + 1), F.cross_entropy, ep * spe,
                          lr=lr_, progress=False)

    # pruning only: per-layer magnitude masks, retrained with the masks held (dense weights)
    pruned = copy.deepcopy(base)
    layers, _, _ = C.compressible_layers(pruned)
    from sqz_kernels.compression.prune import prune_
    prune_(layers, {n: density for n in layers}, block=block)
    how = "" if block == 1 else f" (blocks of {block})"
    rows.append((f"pruned {density:.0%}{how}, no retrain", accuracy(pruned, xte, yte), None))
    with C.MaskHold(layers, {n: l.weight != 0 for n, l in layers.items()}):
        ft(prune_epochs, prune_lr)(pruned)
    rows.append((f"pruned {density:.0%}{how} + retrain ({prune_epochs} ep)", accuracy(pruned, xte, yte), None))

    # quantization only: every weight kept, shared centroids, fine-tuned
    m = copy.deepcopy(base)
    C.compress(m, density=1.0, bits=bits, progress=False)
    rows.append((f"{bits}-bit, no fine-tune", accuracy(m, xte, yte), None))
    ft(ft_epochs, ft_lr)(m)
    rows.append((f"{bits}-bit + centroid fine-tune ({ft_epochs} ep)", accuracy(m, xte, yte), None))

    # Deep Compression: the pruned+retrained net (its zeros are exactly the 67 % that
    # compress() would prune) -> k-means -> centroid fine-tuning -> .sqz -> fresh model
    m = copy.deepcopy(pruned)
    rep = C.compress(m, density=density, bits=bits, progress=False, block=block)
    rows.append((f"{density:.0%}{how} + {bits}-bit, no centroid fine-tune", accuracy(m, xte, yte), None))
    ft(ft_epochs, ft_lr)(m)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "digits.sqz")
        nbytes = C.save(m, path)
        m2 = C.load(path, make_model())
    rows.append((f"{density:.0%}{how} + {bits}-bit + fine-tune, from .sqz", accuracy(m2, xte, yte), nbytes))
    log(f"{'model':<44}{'top-1 %':>9}{'delta':>8}")
    for name, acc, nb in rows:
        extra = f"   file {nb} B" if nb else ""
        log(f"{name:<44}{acc:>9.2f}{acc - rows[0][1]:>+8.2f}{extra}")
    log(str(C.report(m2)))
    dense_b = rep.stages()["dense"]
    log(f"dense {dense_b} B -> .sqz {nbytes} B ({dense_b / nbytes:.1f}x); total time {time.time() - t0:.0f} s")
    return {name: acc for name, acc, _ in rows}, rep


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--prune-epochs", type=int, default=20)
    ap.add_argument("--prune-lr", type=float, default=1e-3)
    ap.add_argument("--ft-epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ft-lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--block", type=int, default=1, help="prune blocks of this many output channels")
    ap.add_argument("--cache", help="a .safetensors file for the trained dense model (reused if present)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run(a.size, a.epochs, a.prune_epochs, a.ft_epochs, a.lr, a.prune_lr, a.ft_lr, seed=a.seed,
        cache=a.cache, block=a.block)
