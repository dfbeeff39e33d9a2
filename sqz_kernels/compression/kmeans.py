"""Per-layer 1-D k-means weight sharing (Deep Compression, section 3).

1-D Lloyd iterations are exact and cheap on sorted data: with centroids sorted, each cluster is
a contiguous run of the sorted values between the midpoints of neighbouring centroids, so one
iteration is a searchsorted plus prefix sums, O(k log n), independent of n after the sort.
"""
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["INITS", "init_centroids", "kmeans_1d"]

INITS = ("linear", "density", "random")


def init_centroids(sorted_x: np.ndarray, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
    """Initial centroids. linear: evenly spaced over [min, max] (the paper's best: it keeps the
    few large weights represented); density: evenly spaced in the CDF; random: k weights drawn."""
    if init == "linear":
        return np.linspace(sorted_x[0], sorted_x[-1], k)
    if init == "density":
        q = (np.arange(k) + 0.5) / k
        return np.quantile(sorted_x, q)
    if init == "random":
        return np.sort(rng.choice(sorted_x, size=k, replace=False))
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def kmeans_1d(values, bits: int, init: str = "linear", iters: int = 300, tol: float = 1e-7,
              seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Cluster 1-D `values` into at most 2**bits shared values.

    Returns (codebook float32 [n], codes int64 [len(values)]) with the codebook sorted ascending,
    empty clusters dropped (n <= 2**bits), every code < n. When the values have at most 2**bits
    distinct values the codebook is exactly those values (lossless)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    x = values.detach().cpu().double().numpy().ravel() if isinstance(values, Tensor) \
        else np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return torch.zeros(1, dtype=torch.float32), torch.zeros(0, dtype=torch.int64)
    if not np.all(np.isfinite(x)):
        raise ValueError("values to quantize contain NaN or inf")
    k = 2 ** bits
    order = np.argsort(x, kind="stable")
    xs = x[order]
    uniq = np.unique(xs)
    if uniq.size <= k:
        cb = uniq
    else:
        rng = np.random.default_rng(seed)
        cb = init_centroids(xs, k, init, rng)
        prefix = np.concatenate([[0.0], np.cumsum(xs)])
        for _ in range(iters):
            cb = np.sort(cb)
            bounds = np.searchsorted(xs, (cb[:-1] + cb[1:]) / 2, side="right")
            edges = np.concatenate([[0], bounds, [xs.size]])
            counts = np.diff(edges)
            sums = prefix[edges[1:]] - prefix[edges[:-1]]
            new = np.where(counts > 0, sums / np.maximum(counts, 1), cb)  # empty: keep centroid
            shift = np.max(np.abs(new - cb))
            cb = new
            if shift <= tol * max(1e-30, xs[-1] - xs[0]):
                break
        cb = np.sort(cb)
        bounds = np.searchsorted(xs, (cb[:-1] + cb[1:]) / 2, side="right")
        counts = np.diff(np.concatenate([[0], bounds, [xs.size]]))
        cb = cb[counts > 0]                              # drop empty clusters
    # final assignment to the nearest centroid (ties to the lower one), in original order
    mids = (cb[:-1] + cb[1:]) / 2
    codes = np.searchsorted(mids, x, side="left")
    return torch.from_numpy(cb.astype(np.float32)), torch.from_numpy(codes.astype(np.int64))
