"""Sparse-codebook kernels vs eager dense conv vs our dense FusedFire, SqueezeNet 1.0 / 1.1 layers,
batch 1, 2 threads, 6-bit codebooks, densities 1.0 / 0.33 / 0.1.

Two ways to run it:

  python bench/bench_codebook.py [--versions 1_0,1_1] [--formats nchw,cl] [--rounds 15]
      side-by-side in one process: per case the implementations alternate round by round, the
      table gives medians and the ratios eager/codebook and fusedfire/codebook (the numbers in
      CODEBOOK_NOTES.md come from here).

  python -m pytest bench/bench_codebook.py --benchmark-only
      the same cases as pytest-benchmark entries (grouped by layer), for the bench/ suite.
"""
import argparse
import os
import sys

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

import sqz_kernels  # noqa: E402,F401
from sqz_kernels import codebook_ops as co  # noqa: E402
from sqz_kernels import ops as sk_ops  # noqa: E402
from sqz_kernels.benchutil import alternate, keep_freed_memory  # noqa: E402
from sqz_kernels.models import FIRE_CONFIGS  # noqa: E402
from codebook_helpers import args, make_layer  # noqa: E402

BITS = 6
DENSITIES = (1.0, 0.33, 0.1)


def conv_cases(version):
    """(name, C, O, k, stride, pad, H) for every conv of SqueezeNet `version` at 224x224."""
    out = []
    if version == "1_0":
        out.append(("conv1", 3, 96, 7, 2, 0, 224))
    else:
        out.append(("conv1", 3, 64, 3, 2, 0, 224))
    for i, (C, S, E1, E3, H) in enumerate(FIRE_CONFIGS[version]):
        f = f"fire{i + 2}"
        out += [(f + ".squeeze", C, S, 1, 1, 0, H), (f + ".expand1x1", S, E1, 1, 1, 0, H),
                (f + ".expand3x3", S, E3, 3, 1, 1, H)]
    out.append(("classifier.1", 512, 1000, 1, 1, 0, 13))
    return out


def fire_cases(version):
    return [(f"fire{i + 2}", *c) for i, c in enumerate(FIRE_CONFIGS[version])]


def _fmt(x, fmt):
    return x.to(memory_format=torch.channels_last) if fmt == "cl" else x


def build_conv(case, density, fmt, seed=0, block=1):
    name, C, O, k, s, p, H = case
    L = make_layer(O, C * k * k, density, BITS, seed=seed, quads=block == 4)
    x = _fmt(torch.randn(1, C, H, H), fmt)
    w = _fmt(L["dense"].float().reshape(O, C, k, k), fmt)
    b = L["bias"]
    a = args(L)
    fns = {
        "codebook": lambda: co.codebook_conv2d(x, *a, k, s, p, True),
        "eager": lambda: F.relu(F.conv2d(x, w, b, s, p)),
    }
    Ho = (H + 2 * p - k) // s + 1
    macs = O * C * k * k * Ho * Ho
    return fns, macs


def build_fire(case, density, fmt, seed=0, block=1):
    name, C, S, E1, E3, H = case
    q = block == 4
    Ls = [make_layer(S, C, density, BITS, seed=seed + 1, quads=q),
          make_layer(E1, S, density, BITS, seed=seed + 2, quads=q),
          make_layer(E3, 9 * S, density, BITS, seed=seed + 3, quads=q)]
    x = _fmt(torch.randn(1, C, H, H), fmt)
    ws = [_fmt(Ls[0]["dense"].float().reshape(S, C, 1, 1), fmt), Ls[0]["bias"],
          _fmt(Ls[1]["dense"].float().reshape(E1, S, 1, 1), fmt), Ls[1]["bias"],
          _fmt(Ls[2]["dense"].float().reshape(E3, S, 3, 3), fmt), Ls[2]["bias"]]
    a = [t for L in Ls for t in args(L)]

    def eager():
        s_ = F.relu(F.conv2d(x, ws[0], ws[1]))
        return torch.cat([F.relu(F.conv2d(s_, ws[2], ws[3])), F.relu(F.conv2d(s_, ws[4], ws[5], padding=1))], 1)

    fns = {"codebook": lambda: co.codebook_fused_fire(x, *a), "eager": eager}
    if hasattr(torch.ops.sqz_kernels, "fused_fire"):
        # through call_op like the codebook op (both take _C.call below autograd)
        fns["fusedfire"] = lambda: sk_ops.fused_fire(x, *ws)
    macs = H * H * (C * S + S * E1 + 9 * S * E3)
    return fns, macs


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", default="1_0,1_1")
    ap.add_argument("--formats", default="nchw,cl")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="substring filter on layer names")
    ap.add_argument("--fires-only", action="store_true")
    ap.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    ap.add_argument("--block", type=int, choices=(1, 4), default=1,
                    help="4: weights pruned in blocks of 4 output channels (the kernels' row quads)")
    a = ap.parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(a.threads)
    print(f"# torch {torch.__version__}, threads {a.threads}, isa {torch.ops.sqz_kernels.cpu_isa()}, "
          f"batch 1, {BITS}-bit, "
          f"{'unstructured pruning' if a.block == 1 else f'pruned in blocks of {a.block} output channels'}; times are medians of {a.rounds} alternating rounds; "
          "'(min)' columns use the fastest round of each (robust on a shared machine)")
    print("| version | fmt | layer | density | codebook ms | eager ms | eager/cb | fusedfire ms | fused/cb "
          "| eager/cb (min) | fused/cb (min) | cb GFLOP/s dense-equiv. |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for v in a.versions.split(","):
            for fmt in a.formats.split(","):
                cases = [("fire", c) for c in fire_cases(v)]
                if not a.fires_only:
                    cases = [("conv", c) for c in conv_cases(v)] + cases
                for kind, case in cases:
                    if a.only and a.only not in case[0]:
                        continue
                    for d in (float(v) for v in a.densities.split(",")):
                        fns, macs = (build_fire if kind == "fire" else build_conv)(case, d, fmt, block=a.block)
                        t, m = alternate(fns, rounds=a.rounds, warmup=1, budget_s=float("inf"),
                                         target_s=0.004, with_min=True)
                        fused = t.get("fusedfire")
                        fms = "" if fused is None else f"{fused * 1e3:.3f}"
                        fr = "" if fused is None else f"{fused / t['codebook']:.2f}"
                        frm = "" if fused is None else f"{m['fusedfire'] / m['codebook']:.2f}"
                        print(f"| {v} | {fmt} | {case[0]}{'' if kind == 'conv' else ' (Fire)'} | {d} | "
                              f"{t['codebook'] * 1e3:.3f} | {t['eager'] * 1e3:.3f} | {t['eager'] / t['codebook']:.2f} | "
                              f"{fms} | {fr} | {m['eager'] / m['codebook']:.2f} | {frm} | "
                              f"{2 * macs / t['codebook'] / 1e9:.1f} |", flush=True)


# ------------------------------------------------------------------------------------------------
# pytest-benchmark entries
# ------------------------------------------------------------------------------------------------
def _ids(c):
    return c[0]


@pytest.fixture(autouse=True)
def _two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    with torch.no_grad():
        yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("version", ["1_0", "1_1"])
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("impl", ["codebook", "eager", "fusedfire"])
@pytest.mark.parametrize("idx", range(8))
def test_bench_fire(benchmark, version, fmt, density, impl, idx):
    case = fire_cases(version)[idx]
    fns, macs = build_fire(case, density, fmt)
    if impl not in fns:
        pytest.skip("dense fused_fire op not in this build")
    benchmark.group = f"{version}-{case[0]}-{fmt}-d{density}"
    benchmark.extra_info["gflops_dense_equiv"] = None
    benchmark.pedantic(fns[impl], rounds=20, iterations=5, warmup_rounds=2)


@pytest.mark.parametrize("version", ["1_0", "1_1"])
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("impl", ["codebook", "eager"])
@pytest.mark.parametrize("idx", range(26))
def test_bench_conv(benchmark, version, fmt, density, impl, idx):
    case = conv_cases(version)[idx]
    fns, macs = build_conv(case, density, fmt)
    benchmark.group = f"{version}-{case[0]}-{fmt}-d{density}"
    benchmark.pedantic(fns[impl], rounds=20, iterations=5, warmup_rounds=2)


if __name__ == "__main__":
    main()
