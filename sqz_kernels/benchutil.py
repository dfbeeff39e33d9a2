"""Timing helpers shared by the CLI and bench/: A/B alternation in one process, medians, GFLOP/s.

This machine class is noisy (two runs of the same benchmark differ by +-20 %), so comparisons are
made side by side: the candidates run in alternating rounds and each one's median is reported.
"""
import io
import statistics
import time
from typing import Callable, Dict, Optional

import torch

__all__ = ["fire_macs", "alternate", "gflops", "threads", "onnxruntime_runner", "keep_freed_memory"]


def fire_macs(batch: int, inplanes: int, squeeze: int, e1: int, e3: int, h: int, w: int) -> int:
    """Multiply-accumulates of one Fire forward."""
    return batch * h * w * (inplanes * squeeze + squeeze * e1 + 9 * squeeze * e3)


def gflops(macs: int, seconds: float) -> float:
    return 2.0 * macs / seconds / 1e9


def alternate(fns: Dict[str, Callable[[], object]], rounds: int = 15, inner: int = 3,
              warmup: int = 2, budget_s: float = 10.0, target_s: Optional[float] = None,
              with_min: bool = False):
    """Median seconds per call of each fn, measured in alternating rounds (A B A B ...).

    inner: calls per timed round; with target_s it is instead chosen after the warm-up so that a
    round of the first fn takes about target_s. Rounds stop early once budget_s has passed (after
    at least 3). with_min: return (medians, fastest round of each), the fastest round being the
    robust figure on a shared machine."""
    with torch.no_grad():
        for _ in range(warmup):
            for f in fns.values():
                f()
        if target_s is not None:
            first = next(iter(fns.values()))
            t0 = time.perf_counter()
            first()
            inner = max(1, int(target_s / max(time.perf_counter() - t0, 1e-7)))
        times = {k: [] for k in fns}
        start = time.perf_counter()
        for r in range(rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(inner):
                    f()
                times[k].append((time.perf_counter() - t0) / inner)
            if time.perf_counter() - start > budget_s and r >= 2:
                break
    med = {k: statistics.median(v) for k, v in times.items()}
    return (med, {k: min(v) for k, v in times.items()}) if with_min else med


def keep_freed_memory():
    """Stop glibc malloc from handing freed blocks back to the OS (mmap threshold and trim
    threshold 1 GB). Alternating two layers that each allocate a multi-MB output otherwise makes
    the allocator return and re-fault those pages on every call: conv1 of SqueezeNet 1.1
    interleaved with the eager conv took 795 page faults and 2.15 ms per codebook call against 0
    and 0.41 ms alone (a whole-network forward has 0 faults in steady state). Both sides of every
    comparison get the same allocator. No-op where mallopt is not glibc's."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class threads:
    """Context manager: torch.set_num_threads(n) inside, restored after."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)



def onnxruntime_runner(model, x, intra_threads: int = 2):
    """A no-argument callable running `model` on `x` in ONNX Runtime (CPU), or None when
    onnxruntime is not installed (it is in the optional `bench` extra)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return lambda: sess.run(None, feed)
