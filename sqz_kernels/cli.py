"""Command line: python -m sqz_kernels {demo, bench, compress, info}."""
import argparse
import copy
import os
import sys
import tempfile

import torch

from . import models
from .benchutil import alternate, fire_macs, gflops, threads
from .fire import EagerFire, FusedFire, fuse_fire_


def _build(arch: str, weights, fmt: str):
    """(eager model, fused model, input) with identical parameters."""
    torch.manual_seed(0)
    eager = getattr(models, arch)(fire_cls=EagerFire).eval()
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)  # never unpickles code
        eager.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    fused = copy.deepcopy(eager)
    n = fuse_fire_(fused)
    x = torch.randn(1, 3, 224, 224)
    if fmt == "channels_last":
        eager, fused = (m.to(memory_format=torch.channels_last) for m in (eager, fused))
        x = x.contiguous(memory_format=torch.channels_last)
    return eager, fused, x, n


def _fire_inputs(model, x):
    """The input tensor each Fire module of `model` sees for input x."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp: seen.append((mod, inp[0])))
             for m in model.modules() if isinstance(m, (EagerFire, FusedFire))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _latency_table(eager, fused, x, rounds, budget_s):
    rows = []
    pairs = zip(_fire_inputs(eager, x), _fire_inputs(fused, x))
    for i, ((em, ex), (fm, _)) in enumerate(pairs):
        med = alternate({"eager": lambda: em(ex), "fused": lambda: fm(ex)}, rounds=rounds,
                        budget_s=budget_s)
        n, c, h, w = ex.shape
        macs = fire_macs(n, c, fm.squeeze.out_channels, fm.expand1x1.out_channels,
                         fm.expand3x3.out_channels, h, w)
        rows.append((f"fire{i + 2} {c}x{h}x{w}", med["eager"], med["fused"], gflops(macs, med["eager"]),
                     gflops(macs, med["fused"])))
    med = alternate({"eager": lambda: eager(x), "fused": lambda: fused(x)}, rounds=rounds,
                    budget_s=2 * budget_s)
    rows.append(("whole network", med["eager"], med["fused"], float("nan"), float("nan")))
    return rows


def _print_table(rows, title):
    print(title)
    print(f"{'':22} {'eager ms':>9} {'fused ms':>9} {'eager GF/s':>11} {'fused GF/s':>11} {'speed-up':>9}")
    for name, te, tf, ge, gf in rows:
        gfs = "" if ge != ge else f"{ge:11.1f} {gf:11.1f}"
        print(f"{name:22} {te * 1e3:9.3f} {tf * 1e3:9.3f} {gfs:>23} {te / tf:8.2f}x")


def cmd_demo(args) -> int:
    with threads(args.threads):
        eager, fused, x, n = _build(args.arch, args.weights, args.format)
        with torch.no_grad():
            diff = (eager(x) - fused(x)).abs().max().item()
        print(f"{args.arch}: swapped {n} Fire modules for FusedFire; "
              f"max |eager - fused| on the logits = {diff:.3g}")
        rows = _latency_table(eager, fused, x, rounds=args.rounds, budget_s=args.budget)
        _print_table(rows, f"batch 1, {args.threads} threads, {args.format}, median of alternating rounds")
        ok = diff < 1e-3
        if args.compress:
            ok = _compressed_demo(args, eager, fused, x) and ok
    return 0 if ok else 1


def _reference_copy(model):
    """A copy of a compressed model whose Codebook modules run the decode-then-ATen reference."""
    from .codebook import CodebookConv2d, CodebookFire, CodebookLinear

    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, (CodebookConv2d, CodebookLinear, CodebookFire)):
            m.forward = m.forward_reference
    return ref


def _compressed_demo(args, eager, fused, x) -> bool:
    """compress -> save -> load -> run the compressed model with the sparse-codebook kernels."""
    from .codebook import fold_pool_, fold_relu_
    from .compression import compress, load, resident_bytes, save
    from .pool import fast_pool_

    model = copy.deepcopy(eager).to(memory_format=torch.contiguous_format)
    compress(model, density=args.density, bits=args.bits, block=args.block)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "net.sqz")
        save(model, path)
        file_bytes = os.path.getsize(path)
        loaded = load(path, getattr(models, args.arch)(fire_cls=EagerFire)).eval()
    if args.format == "channels_last":
        loaded = loaded.to(memory_format=torch.channels_last)
    reference = _reference_copy(loaded)
    # the same compressed model with sqz's max-pool, the ReLUs after conv1 / the classifier conv
    # folded into their codebook kernels and the first max-pool into conv1's
    tuned = copy.deepcopy(loaded)
    fast_pool_(tuned)
    fold_relu_(tuned)
    fold_pool_(tuned)
    # and the tuned model as one chain of sqz ops run from C++ (no Python between layers); the
    # constructor raises unless the chain equals the tuned model bit for bit on x
    from .chain import KernelChain
    chain = KernelChain(tuned, x)
    with torch.no_grad():
        y_dense, y_comp, y_ref, y_tuned = eager(x), loaded(x), reference(x), tuned(x)
    kernel_diff = max((y_comp - y_ref).abs().max().item(), (y_tuned - y_ref).abs().max().item())
    dense_diff = (y_comp - y_dense).abs().max().item()
    med = alternate({"eager": lambda: eager(x), "fused": lambda: fused(x), "compressed": lambda: loaded(x),
                     "tuned": lambda: tuned(x), "chain": lambda: chain(x)}, rounds=args.rounds,
                    budget_s=2 * args.budget)
    dense_bytes = sum(p.numel() * p.element_size() for p in eager.parameters())
    pruning = "unstructured pruning" if args.block == 1 else f"pruned in blocks of {args.block} rows"
    print(f"\ncompressed {args.arch}: density {args.density}, {args.bits}-bit codebooks, {pruning} "
          f"(dense fp32 / file = {dense_bytes / file_bytes:.1f}x)")
    print(f"{'model':28} {'weights bytes':>14} {'latency ms':>11}")
    print(f"{'dense eager':28} {dense_bytes:14,d} {med['eager'] * 1e3:11.3f}")
    print(f"{'dense FusedFire':28} {dense_bytes:14,d} {med['fused'] * 1e3:11.3f}")
    print(f"{'compressed, resident':28} {resident_bytes(loaded):14,d} {med['compressed'] * 1e3:11.3f}")
    print(f"{'  + sqz pools, all folds':28} {resident_bytes(tuned):14,d} {med['tuned'] * 1e3:11.3f}")
    print(f"{'  + run as a KernelChain':28} {resident_bytes(tuned):14,d} {med['chain'] * 1e3:11.3f}")
    print(f"{'compressed, .sqz file':28} {file_bytes:14,d}")
    print(f"max |kernels - decoded reference| = {kernel_diff:.3g}   "
          f"max |compressed - dense| = {dense_diff:.3g} (pruning + quantisation changes the function)")
    return kernel_diff <= 1e-4 * max(1.0, y_ref.abs().max().item())


def cmd_bench(args) -> int:
    results = {}
    for fmt in ("nchw", "channels_last"):
        with threads(args.threads):
            eager, fused, x, _ = _build(args.arch, args.weights, fmt)
            rows = _latency_table(eager, fused, x, rounds=args.rounds, budget_s=args.budget)
        _print_table(rows, f"{args.arch}, batch 1, {args.threads} threads, {fmt}")
        results[fmt] = rows
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4))
        names = [r[0].split()[0] for r in results["nchw"]]
        width = 0.4
        for k, (fmt, rows) in enumerate(results.items()):
            ax.bar([i + (k - 0.5) * width for i in range(len(rows))], [r[1] / r[2] for r in rows],
                   width, label=fmt)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_ylabel("speed-up over eager (x)")
        ax.set_title(f"FusedFire vs eager Fire, {args.arch}, batch 1, {args.threads} threads")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot written to {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sqz_kernels", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, rounds, budget):
        sp.add_argument("--arch", default="squeezenet1_1", choices=["squeezenet1_0", "squeezenet1_1"])
        sp.add_argument("--weights", help="a torchvision state_dict file (loaded with weights_only=True)")
        sp.add_argument("--threads", type=int, default=2)
        sp.add_argument("--rounds", type=int, default=rounds, help="alternating timing rounds")
        sp.add_argument("--budget", type=float, default=budget, help="seconds per timed item, at most")

    d = sub.add_parser("demo", help="swap in FusedFire, check outputs, print a latency table (~1 min)")
    common(d, rounds=15, budget=3.0)
    d.add_argument("--format", default="nchw", choices=["nchw", "channels_last"])
    d.add_argument("--compress", action="store_true",
                   help="also compress -> save -> load -> run with the sparse-codebook kernels")
    d.add_argument("--density", type=float, default=0.33)
    d.add_argument("--bits", type=int, default=6)
    d.add_argument("--block", type=int, default=1,
                   help="prune blocks of this many output channels together (4: row quads)")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="larger-scale per-Fire and whole-network timing + PNG plot")
    common(b, rounds=41, budget=10.0)
    b.add_argument("--plot", default="fire_speedups.png", help="PNG path ('' to skip)")
    b.set_defaults(func=cmd_bench)

    try:  # compress / info come with the compression subpackage
        from .compression.cli import add_subcommands
    except ImportError:
        pass
    else:
        add_subcommands(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
