"""CPU FusedFire vs the eager Fire (oneDNN), every SqueezeNet 1.0/1.1 Fire config.

Run: `pytest bench/bench_fire.py --benchmark-only` (or `make bench`). Each test times the fused
module with pytest-benchmark and, side by side in the same process, alternates eager and fused
rounds; the medians, GFLOP/s (2*MACs/time) and the speed-up go into the benchmark's extra_info
(shown with --benchmark-json, or printed by bench/summarize.py).
"""
import pytest
import torch

import sqz_kernels as sk
from sqz_kernels.benchutil import alternate, fire_macs, gflops, threads
from sqz_kernels.models import FIRE_CONFIGS

CASES = [(ver, i, cfg) for ver, cfgs in FIRE_CONFIGS.items() for i, cfg in enumerate(cfgs)]


@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"sq{c[0]}-fire{c[1] + 2}")
def test_fire(benchmark, case, batch, nthreads, fmt):
    ver, idx, (c, s, e1, e3, side) = case
    torch.manual_seed(0)
    fused = sk.FusedFire(c, s, e1, e3).eval()
    eager = fused.to_fire().eval()
    x = torch.randn(batch, c, side, side)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    macs = fire_macs(batch, c, s, e1, e3, side, side)
    with threads(nthreads), torch.no_grad():
        med = alternate({"eager": lambda: eager(x), "fused": lambda: fused(x)},
                        rounds=9 if batch == 1 else 5)
        benchmark.pedantic(fused, args=(x,), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        squeezenet=ver, fire=idx + 2, shape=[batch, c, side, side], threads=nthreads, format=fmt,
        eager_ms=med["eager"] * 1e3, fused_ms=med["fused"] * 1e3,
        eager_gflops=gflops(macs, med["eager"]), fused_gflops=gflops(macs, med["fused"]),
        speedup=med["eager"] / med["fused"])
