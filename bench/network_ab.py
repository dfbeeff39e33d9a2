"""Whole SqueezeNet 1.1 (batch 1, 2 threads, compressed 33 % / 6-bit, every fold) against ONNX
Runtime on the dense model, in one process: each round runs every candidate in a random order, a
turn being `--warmup` untimed calls then `--inner` timed ones (the untimed call absorbs what the
candidate before left behind: ONNX Runtime's threads keep spinning for milliseconds after a run).
Prints medians and each candidate's time as a fraction of ONNX Runtime's.

usage: python bench/network_ab.py [--rounds 41] [--inner 3] [--warmup 1] [--settle-ms 0]
"""
import argparse
import copy
import random
import statistics
import time

import torch

import sqz_kernels as sk
from sqz_kernels.benchutil import keep_freed_memory, onnxruntime_runner
from sqz_kernels.fire import EagerFire


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--inner", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--settle-ms", type=float, default=0.0,
                    help="sleep after every turn, so no candidate starts while another's threads spin")
    a = ap.parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    eager = sk.models.squeezenet1_1(fire_cls=EagerFire).eval()
    x = torch.randn(1, 3, 224, 224)
    fns = {}
    for block, label in ((1, "unstructured"), (4, "blocks of 4 rows")):
        comp = copy.deepcopy(eager)
        sk.compress(comp, density=0.33, bits=6, block=block, progress=False)
        sk.fast_pool_(comp)
        sk.fold_relu_(comp)
        sk.fold_pool_(comp)
        fns[f"compressed, {label}, modules"] = (lambda m: lambda: m(x))(comp)
        fns[f"compressed, {label}, KernelChain"] = (lambda r: lambda: r(x))(sk.KernelChain(comp, x))
    ort = onnxruntime_runner(eager, x)
    if ort is None:
        raise SystemExit("onnxruntime is not installed (pip install onnxruntime)")
    fns["ONNX Runtime (dense)"] = ort
    ts = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(a.rounds):
            for k in random.sample(list(fns), len(fns)):
                for _ in range(a.warmup):
                    fns[k]()
                t0 = time.perf_counter()
                for _ in range(a.inner):
                    fns[k]()
                ts[k].append((time.perf_counter() - t0) / a.inner)
                if a.settle_ms > 0:
                    time.sleep(a.settle_ms / 1e3)
    med = {k: statistics.median(v) for k, v in ts.items()}
    ort_t = med["ONNX Runtime (dense)"]
    print(f"| SqueezeNet 1.1, batch 1, 2 threads ({a.rounds} rounds, random order, warm-up "
          f"{a.warmup}, {a.inner} timed, settle {a.settle_ms:g} ms) | median ms | "
          "time / ONNX Runtime's |")
    print("|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v * 1e3:.2f} | {v / ort_t:.2f} |")


if __name__ == "__main__":
    main()
