"""CUDA benchmarks of FusedFire against the eager Fire (cuDNN), and of whole SqueezeNet 1.1.

    python bench/bench_fire_cuda.py [--out DIR] [--budget SECONDS] [--quick]

* Per Fire config (SqueezeNet 1.0 and 1.1), batch 1 / 8 / 64, float32 / float16 / bfloat16:
  eager Fire (cuDNN, torch.backends.cudnn.benchmark=True, NCHW and channels_last) vs FusedFire.
* Whole SqueezeNet 1.1 at batch 1 and 64 (fp32, fp16): eager, fused, fused under a CUDA graph
  (and eager under a CUDA graph, for reference).

Timing: CUDA events around a run of R calls (R sized to ~2 ms), repeated, median per call; warm-up
first; inputs rotate over several buffers. Every loop is bounded by the time budget: cases that do
not fit are recorded as skipped. fp32 convolutions run without TF32 (as the fused fp32 path does).
Writes fire_cuda.json (and prints a compact table last). Exits with status 2 and a clear message
when no CUDA GPU is present.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "results"),
                    help="directory for fire_cuda.json (default: $OUT or bench/results)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for all benchmarks")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    return ap.parse_args(argv)


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()


def time_cuda(fn, n_inputs, deadline, reps=7, target_ms=2.0, warmup=3, max_case_s=4.0):
    """Median time per call in microseconds of fn(i) (i rotates over n_inputs buffers)."""
    case_end = time.monotonic() + max_case_s
    for i in range(warmup):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    # size R from one timed call run
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(4):
        fn(i % n_inputs)
    stop.record()
    stop.synchronize()
    per = max(start.elapsed_time(stop) / 4, 1e-3)  # ms
    r = int(min(max(target_ms / per, 1), 200))
    samples = []
    k = 0
    for _ in range(reps):
        if samples and (time.monotonic() > case_end or deadline.left() < 0):
            break
        start.record()
        for _ in range(r):
            fn(k % n_inputs)
            k += 1
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1000.0 / r)
    return statistics.median(samples), len(samples), r


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def bench_fires(args, deadline, results):
    import sqz_kernels as sk
    from sqz_kernels.models import FIRE_CONFIGS

    batches = [int(b) for b in args.batches.split(",") if b]
    dtypes = [d for d in args.dtypes.split(",") if d]
    reps = 3 if args.quick else 7
    n_rot = 3
    for dname in dtypes:
        dtype = DTYPES[dname]
        for version, cfgs in FIRE_CONFIGS.items():
            for idx, (c, s, e1, e3, hw) in enumerate(cfgs):
                eager = sk.EagerFire(c, s, e1, e3).cuda().to(dtype).eval()
                fused = sk.FusedFire.from_fire(eager)
                for b in batches:
                    rec = dict(kind="fire", version=version, fire=idx, cfg=[c, s, e1, e3, hw],
                               batch=b, dtype=dname)
                    if deadline.left() < 5:
                        rec["skipped"] = "time budget"
                        results.append(rec)
                        continue
                    macs = b * hw * hw * (c * s + s * e1 + 9 * s * e3)
                    xs = [torch.randn(b, c, hw, hw, device="cuda", dtype=dtype) for _ in range(n_rot)]
                    xcl = [x.contiguous(memory_format=torch.channels_last) for x in xs]
                    with torch.no_grad():
                        try:
                            y_f = fused(xs[0])
                            y_e = eager(xs[0])
                            rec["rel_err_vs_eager"] = rel_err(y_f, y_e)
                            t_e, _, _ = time_cuda(lambda i: eager(xs[i]), n_rot, deadline, reps)
                            t_ecl, _, _ = time_cuda(lambda i: eager(xcl[i]), n_rot, deadline, reps)
                            t_f, nrep, r = time_cuda(lambda i: fused(xs[i]), n_rot, deadline, reps)
                            t_fcl, _, _ = time_cuda(lambda i: fused(xcl[i]), n_rot, deadline, reps)
                        except Exception as e:  # record and go on
                            rec["error"] = f"{type(e).__name__}: {e}"[:500]
                            results.append(rec)
                            continue
                    best_eager = min(t_e, t_ecl)
                    rec.update(eager_us=t_e, eager_cl_us=t_ecl, fused_us=t_f, fused_cl_us=t_fcl,
                               speedup=t_e / t_f, speedup_vs_best_eager=best_eager / min(t_f, t_fcl),
                               fused_gflops=2 * macs / t_f / 1e3, eager_gflops=2 * macs / t_e / 1e3,
                               reps=nrep, calls_per_rep=r)
                    results.append(rec)
                    del xs, xcl
                del eager, fused


def bench_net(args, deadline, results):
    import copy

    import sqz_kernels as sk
    from sqz_kernels.fire import EagerFire
    from sqz_kernels.models import squeezenet1_1

    reps = 3 if args.quick else 7
    for dname in ("fp32", "fp16"):
        dtype = DTYPES[dname]
        eager = squeezenet1_1(fire_cls=EagerFire).cuda().to(dtype).eval()
        fused = copy.deepcopy(eager)
        n_swapped = sk.fuse_fire_(fused)
        for b in (1, 64):
            rec = dict(kind="net", model="squeezenet1_1", batch=b, dtype=dname, fused_fires=n_swapped)
            if deadline.left() < 8:
                rec["skipped"] = "time budget"
                results.append(rec)
                continue
            xs = [torch.randn(b, 3, 224, 224, device="cuda", dtype=dtype) for _ in range(3)]
            try:
                with torch.no_grad():
                    rec["rel_err_vs_eager"] = rel_err(fused(xs[0]), eager(xs[0]))
                    rec["eager_us"] = time_cuda(lambda i: eager(xs[i]), 3, deadline, reps, target_ms=5)[0]
                    rec["fused_us"] = time_cuda(lambda i: fused(xs[i]), 3, deadline, reps, target_ms=5)[0]
                    for name, model in (("fused_graph_us", fused), ("eager_graph_us", eager)):
                        static_x = xs[0].clone()
                        s = torch.cuda.Stream()
                        s.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(s):
                            for _ in range(3):
                                model(static_x)
                        torch.cuda.current_stream().wait_stream(s)
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g):
                            static_y = model(static_x)

                        def replay(i, g=g, static_x=static_x):
                            static_x.copy_(xs[i])
                            g.replay()

                        rec[name] = time_cuda(replay, 3, deadline, reps, target_ms=5)[0]
                        if name == "fused_graph_us":
                            static_x.copy_(xs[1])
                            g.replay()
                            rec["graph_rel_err_vs_eager"] = rel_err(static_y, eager(xs[1]))
                        del g
                rec["speedup_fused"] = rec["eager_us"] / rec["fused_us"]
                rec["speedup_fused_graph"] = rec["eager_us"] / rec["fused_graph_us"]
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"[:500]
            results.append(rec)
            del xs
        del eager, fused


def fmt_us(v):
    return "-" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def print_table(results):
    fires = [r for r in results if r["kind"] == "fire"]
    nets = [r for r in results if r["kind"] == "net"]
    batches = sorted({r["batch"] for r in fires})
    print()
    print("FusedFire vs eager Fire (cuDNN, NCHW) -- fused us / speedup [vs best eager layout]")
    hdr = f"{'fire':<10}{'C,S,E1,E3,HW':<20}{'dt':<5}" + "".join(f"{'b' + str(b):>24}" for b in batches)
    print(hdr)
    keys = []
    for r in fires:
        k = (r["version"], r["fire"], r["dtype"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        rows = {r["batch"]: r for r in fires if (r["version"], r["fire"], r["dtype"]) == k}
        any_r = next(iter(rows.values()))
        line = f"{k[0] + '/' + str(k[1]):<10}{','.join(map(str, any_r['cfg'])):<20}{k[2]:<5}"
        for b in batches:
            r = rows.get(b)
            if r is None or "fused_us" not in r:
                cell = "skip" if r is not None and "skipped" in r else ("ERR" if r is not None else "-")
            else:
                cell = f"{fmt_us(r['fused_us'])} {r['speedup']:.2f}x [{r['speedup_vs_best_eager']:.2f}x]"
            line += f"{cell:>24}"
        print(line)
    if nets:
        print()
        print("SqueezeNet 1.1 (us per forward): eager | fused | fused+graph | eager+graph | speedup fused+graph")
        for r in nets:
            if "fused_graph_us" in r:
                print(f"  b{r['batch']:<3} {r['dtype']}: {fmt_us(r['eager_us'])} | {fmt_us(r['fused_us'])} | "
                      f"{fmt_us(r['fused_graph_us'])} | {fmt_us(r['eager_graph_us'])} | "
                      f"{r['speedup_fused_graph']:.2f}x  (rel err {r.get('rel_err_vs_eager', float('nan')):.1e})")
            else:
                print(f"  b{r['batch']:<3} {r['dtype']}: {r.get('error') or r.get('skipped')}")
    errs = [r for r in results if "error" in r]
    if errs:
        print(f"\n{len(errs)} case(s) raised errors; first: {errs[0]['error']}")
    bad = [r for r in fires if r.get("rel_err_vs_eager", 0) > (1e-3 if r["dtype"] == "fp32" else 3e-2)]
    if bad:
        print(f"{len(bad)} case(s) differ from eager beyond tolerance, e.g. "
              f"{bad[0]['version']}/{bad[0]['fire']} {bad[0]['dtype']} b{bad[0]['batch']}: {bad[0]['rel_err_vs_eager']:.2e}")


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fire_cuda: no CUDA GPU available (torch.cuda.is_available() is False); "
              "nothing to benchmark.", file=sys.stderr)
        return 2
    import sqz_kernels  # noqa: F401  (fails clearly if the extension is not built)
    if not torch._C._dispatch_has_kernel_for_dispatch_key("sqz_kernels::fused_fire", "CUDA"):
        print("bench_fire_cuda: sqz_kernels was built without CUDA kernels (rebuild with a CUDA "
              "toolkit, SQZ_CUDA=1).", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)
    deadline = Deadline(args.budget)
    results = []
    t0 = time.monotonic()
    # Net first (small, the headline), then the per-Fire sweep with what is left.
    net_deadline = Deadline(min(args.budget * 0.3, 90))
    bench_net(args, net_deadline, results)
    bench_fires(args, deadline, results)
    meta = dict(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                python=platform.python_version(), seconds=time.monotonic() - t0,
                budget_s=args.budget, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    path = os.path.join(args.out, "fire_cuda.json")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    print(f"wrote {path} ({len(results)} records, {meta['seconds']:.0f} s) on {meta['gpu']}")
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
