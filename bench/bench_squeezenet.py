"""Whole SqueezeNet 1.1, batch 1, 2 threads: eager vs FusedFire model vs torch.compile, and ONNX
Runtime when installed (the `bench` extra). Run: `pytest bench/bench_squeezenet.py --benchmark-only`.
"""
import copy

import pytest
import torch

import sqz_kernels as sk
from sqz_kernels.benchutil import alternate, onnxruntime_runner, threads
from sqz_kernels.fire import EagerFire


def _models(fmt):
    torch.manual_seed(0)
    eager = sk.models.squeezenet1_1(fire_cls=EagerFire).eval()
    fused = copy.deepcopy(eager)
    sk.fuse_fire_(fused)
    x = torch.randn(1, 3, 224, 224)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        eager = eager.to(memory_format=torch.channels_last)
        fused = fused.to(memory_format=torch.channels_last)
    return eager, fused, x


@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
def test_squeezenet1_1(benchmark, fmt):
    eager, fused, x = _models(fmt)
    fns = {"eager": lambda: eager(x), "fused": lambda: fused(x)}
    with threads(2), torch.no_grad():
        if fmt == "nchw":
            ort_run = onnxruntime_runner(eager, x.contiguous())
            if ort_run is not None:
                fns["onnxruntime"] = ort_run
            compiled = torch.compile(copy.deepcopy(eager))
            compiled(x)
            fns["torch.compile"] = lambda: compiled(x)
        med = alternate(fns, rounds=15, inner=3, budget_s=30)
        benchmark.pedantic(fused, args=(x,), rounds=10, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update({f"{k}_ms": v * 1e3 for k, v in med.items()})
    benchmark.extra_info["speedup_vs_eager"] = med["eager"] / med["fused"]
