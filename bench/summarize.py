"""Print a compact table from a pytest-benchmark JSON written by the bench/ suites.

usage: python bench/summarize.py bench/results/latest.json
"""
import json
import sys


def main(path):
    with open(path) as f:
        data = json.load(f)
    fires, nets = [], []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        (fires if "fire" in info else nets).append((b["name"], info))
    if fires:
        print(f"{'test':58} {'eager GF/s':>10} {'fused GF/s':>10} {'speed-up':>8}")
        for name, i in fires:
            print(f"{name:58} {i['eager_gflops']:10.1f} {i['fused_gflops']:10.1f} {i['speedup']:7.2f}x")
    for name, i in nets:
        times = ", ".join(f"{k[:-3]} {v:.2f} ms" for k, v in i.items() if k.endswith("_ms"))
        print(f"{name}: {times}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/latest.json")
