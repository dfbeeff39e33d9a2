"""Row quads, same process: per SqueezeNet Fire (batch 1, 6-bit, 33 % unless --density), the
CodebookFire on block-pruned streams with quads on, with quads off (SQZ_QUADS=0: the row kernel on
the same streams), the CodebookFire on unstructured streams of the same density, and the dense
FusedFire, alternating in random order round by round. Prints medians as ratios to "quads".

usage: python bench/quad_ab.py [--version 1_1] [--threads 2] [--density 0.33] [--rounds 15]
"""
import argparse
import os
import random
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from bench_codebook import build_fire, fire_cases  # noqa: E402


def _timed(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _with_quads(on, fn):
    def run():
        os.environ["SQZ_QUADS"] = "1" if on else "0"  # read by the op on every call
        return fn()
    return run


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--version", default="1_1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--density", type=float, default=0.33)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"# SqueezeNet {a.version} Fires, batch 1, {a.threads} threads, density {a.density}, 6-bit; "
          f"medians of {a.rounds} rounds in random order; ratios > 1: quads faster")
    print("| Fire | quads ms | quads off / quads | unstructured / quads | FusedFire / quads |")
    print("|---|---:|---:|---:|---:|")
    with torch.no_grad():
        for case in fire_cases(a.version):
            blocked, _ = build_fire(case, a.density, "nchw", block=4)
            unstructured, _ = build_fire(case, a.density, "nchw", block=1)
            fns = {"quads": _with_quads(True, blocked["codebook"]),
                   "off": _with_quads(False, blocked["codebook"]),
                   "unstructured": _with_quads(True, unstructured["codebook"]),
                   "fused": blocked["fusedfire"]}
            for f in fns.values():
                f()
            ts = {k: [] for k in fns}
            for _ in range(a.rounds):
                order = list(fns)
                random.shuffle(order)
                for k in order:
                    ts[k].append(_timed(fns[k], 5))
            m = {k: statistics.median(v) for k, v in ts.items()}
            print(f"| {case[0]} | {m['quads'] * 1e3:.3f} | {m['off'] / m['quads']:.2f} | "
                  f"{m['unstructured'] / m['quads']:.2f} | {m['fused'] / m['quads']:.2f} |", flush=True)
    os.environ.pop("SQZ_QUADS", None)


if __name__ == "__main__":
    main()
