"""One-shot CPU summary for the README: per-Fire FusedFire vs eager, whole SqueezeNet 1.1 vs peers.

usage: python bench/report.py [--out bench/results/cpu_summary.md] [--rounds 15] [--network-only]

Every comparison alternates its candidates in one process and reports medians (this machine class
is noisy: +-20 % between runs). GFLOP/s = 2 * MACs / median time.
"""
import argparse
import copy
import platform
import time

import torch

import sqz_kernels as sk
from sqz_kernels.benchutil import (alternate, fire_macs, gflops, keep_freed_memory, onnxruntime_runner,
                                  threads)
from sqz_kernels.fire import EagerFire
from sqz_kernels.models import FIRE_CONFIGS


def fire_rows(rounds, nthreads):
    lines = ["| Fire (C, S, E, map) | format | eager GF/s | fused GF/s | speed-up |", "|---|---|---:|---:|---:|"]
    for ver, cfgs in FIRE_CONFIGS.items():
        for i, (c, s, e1, e3, side) in enumerate(cfgs):
            torch.manual_seed(0)
            fused = sk.FusedFire(c, s, e1, e3).eval()
            eager = fused.to_fire().eval()
            macs = fire_macs(1, c, s, e1, e3, side, side)
            for fmt in ("nchw", "channels_last"):
                x = torch.randn(1, c, side, side)
                if fmt == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                with threads(nthreads):
                    med = alternate({"eager": lambda: eager(x), "fused": lambda: fused(x)}, rounds=rounds,
                                    budget_s=4)
                lines.append(f"| {ver.replace('_', '.')} fire{i + 2} ({c}, {s}, {e1}+{e3}, {side}²) | {fmt} | "
                             f"{gflops(macs, med['eager']):.0f} | {gflops(macs, med['fused']):.0f} | "
                             f"{med['eager'] / med['fused']:.2f}× |")
    return lines


def network_rows(rounds):
    torch.manual_seed(0)
    eager = sk.models.squeezenet1_1(fire_cls=EagerFire).eval()
    fused = copy.deepcopy(eager)
    sk.fuse_fire_(fused)
    comp = copy.deepcopy(eager)
    sk.compress(comp, density=0.33, bits=6, progress=False)
    # pruned in blocks of 4 output channels: the kernels run row quads (same density and bits)
    comp_q = copy.deepcopy(eager)
    sk.compress(comp_q, density=0.33, bits=6, block=4, progress=False)
    x = torch.randn(1, 3, 224, 224)
    xcl = x.contiguous(memory_format=torch.channels_last)
    eager_cl = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    fused_cl = copy.deepcopy(fused).to(memory_format=torch.channels_last)
    # the same models with sqz's max_pool2d in place of ATen's (sk.fast_pool_), and the compressed
    # one with the ReLUs after conv1 / the classifier conv folded into its kernels (sk.fold_relu_)
    fused_p, fused_cl_p, comp_p, comp_qp = (copy.deepcopy(m) for m in (fused, fused_cl, comp, comp_q))
    for m in (fused_p, fused_cl_p, comp_p, comp_qp):
        sk.fast_pool_(m)
    sk.fold_relu_(comp_p)
    sk.fold_relu_(comp_qp)
    # and with every max-pool folded into the kernel before it (sk.fold_pool_: conv1, fire3, fire5)
    comp_pp, comp_qpp = copy.deepcopy(comp_p), copy.deepcopy(comp_qp)
    sk.fold_pool_(comp_pp)
    sk.fold_pool_(comp_qpp)
    # the folded models run as one chain of sqz ops from C++ (sk.KernelChain: no Python between
    # the layers)
    chain_pp, chain_qpp = sk.KernelChain(comp_pp, x), sk.KernelChain(comp_qpp, x)
    fns = {
        "eager NCHW": lambda: eager(x),
        "eager channels_last": lambda: eager_cl(xcl),
        "FusedFire NCHW": lambda: fused(x),
        "FusedFire channels_last": lambda: fused_cl(xcl),
        "compressed 33 %/6-bit, codebook kernels, NCHW": lambda: comp(x),
        "compressed 33 %/6-bit, codebook kernels, channels_last": lambda: comp(xcl),
        "FusedFire + sqz pools, NCHW": lambda: fused_p(x),
        "FusedFire + sqz pools, channels_last": lambda: fused_cl_p(xcl),
        "compressed + sqz pools + folded ReLUs, NCHW": lambda: comp_p(x),
        "compressed + sqz pools + folded ReLUs, channels_last": lambda: comp_p(xcl),
        "compressed, blocks of 4 rows, + sqz pools + folded ReLUs, NCHW": lambda: comp_qp(x),
        "compressed, blocks of 4 rows, + sqz pools + folded ReLUs, channels_last": lambda: comp_qp(xcl),
        "compressed + sqz pools + folded ReLUs + folded pools, NCHW": lambda: comp_pp(x),
        "compressed, blocks of 4 rows, + sqz pools + folded ReLUs + folded pools, NCHW": lambda: comp_qpp(x),
        "compressed, blocks of 4 rows, + sqz pools + folded ReLUs + folded pools, channels_last":
            lambda: comp_qpp(xcl),
        "compressed + every fold, NCHW, KernelChain": lambda: chain_pp(x),
        "compressed, blocks of 4 rows, + every fold, NCHW, KernelChain": lambda: chain_qpp(x),
    }
    with threads(2), torch.no_grad():
        compiled = torch.compile(copy.deepcopy(eager))
        compiled(x)
        fns["torch.compile (inductor)"] = lambda: compiled(x)
        ort = onnxruntime_runner(eager, x)
        if ort is not None:
            fns["ONNX Runtime (dense)"] = ort
        # ONNX Runtime runs last in each round: its worker threads keep spinning for milliseconds
        # after a run and slow whatever runs next (measured 1.1-1.7x), here the eager baseline
        med = alternate(fns, rounds=rounds, inner=3, budget_s=90)
    lines = ["| SqueezeNet 1.1, batch 1, 2 threads | median ms | vs eager NCHW |", "|---|---:|---:|"]
    for k, v in med.items():
        lines.append(f"| {k} | {v * 1e3:.2f} | {med['eager NCHW'] / v:.2f}× |")
    return lines


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/cpu_summary.md")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--network-only", action="store_true",
                   help="only the whole-network table (default --out bench/results/network_summary.md)")
    args = p.parse_args()
    # alternating Fires that each allocate a multi-MB output would otherwise re-fault its pages on
    # every call (see keep_freed_memory); every candidate gets the same allocator
    keep_freed_memory()
    if args.network_only:
        args.threads = []
        if args.out == p.get_default("out"):
            args.out = "bench/results/network_summary.md"
    t0 = time.time()
    out = [f"# CPU summary ({time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
           f"torch {torch.__version__}, ISA {sk.ops.cpu_isa()})", ""]
    out += ["## Whole network", ""] + network_rows(args.rounds) + [""]
    for n in args.threads:
        out += [f"## Fire modules, batch 1, {n} thread{'s' if n > 1 else ''}", ""] + fire_rows(args.rounds, n) + [""]
    out.append(f"(measured in {time.time() - t0:.0f} s with `python bench/report.py`)")
    text = "\n".join(out)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
