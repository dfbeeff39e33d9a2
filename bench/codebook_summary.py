"""Ranges per layer kind of a bench_codebook.py table (the README's codebook summary).

usage: python bench/codebook_summary.py bench/results/codebook_2threads_1_1.md
"""
import sys
from collections import defaultdict


def kind(layer):
    if layer.endswith("(Fire)"):
        return "Fires"
    if layer == "conv1" or layer.startswith("classifier"):
        return layer
    return "expand3x3 convs" if layer.endswith("expand3x3") else "1x1 convs"


def main(path):
    cells = defaultdict(list)  # (kind, fmt, density, column) -> values
    for line in open(path):
        f = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(f) < 12 or f[0] in ("version", "---"):
            continue
        _, fmt, layer, d = f[:4]
        cells[(kind(layer), fmt, d, "eager/cb")].append(float(f[6]))
        if f[8]:
            cells[(kind(layer), fmt, d, "fused/cb")].append(float(f[8]))
    print("| kind | fmt | density | ratio | min | max | n >= 1.5 / 3 |")
    print("|---|---|---|---|---:|---:|---|")
    for (k, fmt, d, col), v in sorted(cells.items()):
        goal = 1.3 if col == "fused/cb" else 3.0 if d == "0.1" else 1.5
        print(f"| {k} | {fmt} | {d} | {col} | {min(v):.2f} | {max(v):.2f} | "
              f"{sum(x >= goal for x in v)} of {len(v)} >= {goal} |")


if __name__ == "__main__":
    main(sys.argv[1])
