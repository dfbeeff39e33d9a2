"""`compress` and `info` subcommands. The package CLI wires them with add_subcommands(sub);
`python -m sqz_kernels.compression.cli ...` also works on its own."""
import argparse
import json
import sys
from typing import List, Optional

__all__ = ["add_subcommands", "main"]

ARCHS = ("squeezenet1_0", "squeezenet1_1")


def _load_weights(model, path: str) -> None:
    """A checkpoint without pickle (.safetensors) or a torch checkpoint read with
    weights_only=True (torch's restricted unpickler: tensors and containers only)."""
    import torch
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"--weights: {path} does not hold a state_dict")
    model.load_state_dict(sd)


def cmd_compress(args) -> int:
    import torch
    from .. import models
    from . import api, container
    torch.manual_seed(args.seed)
    try:
        model = getattr(models, args.arch)(num_classes=args.num_classes)
        if args.weights:
            _load_weights(model, args.weights)
        model.eval()
        report = api.compress(model, density=args.density, bits=args.bits, preset=args.preset,
                              init=args.init, block=args.block, index_bits=args.index_bits,
                              codebook_dtype=args.codebook_dtype, progress=not args.quiet)
        report.file_bytes = container.save(model, args.output, index_bits=args.index_bits,
                                           codebook_dtype=args.codebook_dtype)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"compress: error: {e}", file=sys.stderr)
        return 2
    src = args.weights or "random init"
    print(f"{args.arch} ({src}) -> {args.output}")
    print(report)
    return 0


def cmd_info(args) -> int:
    from . import api, container
    try:
        report = api.file_report(args.path)
        meta = container.read_metadata(args.path)
        if args.verify:
            container.read(args.path)          # decodes every stream, checks every CRC
    except (ValueError, OSError) as e:
        print(f"info: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0
    print(f"{args.path}: {meta['format']} v{meta['version']}, {len(meta['layers'])} compressed layers, "
          f"{len(meta['fires'])} Fire modules, codebooks {meta['codebook_dtype']}, "
          f"Huffman chunk {meta['chunk']} symbols" + (", all streams verified" if args.verify else ""))
    print(report)
    return 0


def _index_bits(v: str):
    return v if v == "auto" else int(v)


def add_subcommands(subparsers) -> None:
    """Add `compress` and `info` to an argparse subparsers object (each sets func(args) -> int)."""
    p = subparsers.add_parser("compress", help="Deep-compress a SqueezeNet into a .sqz file",
                              description="Prune, k-means share and Huffman-code a model into a .sqz file.")
    p.add_argument("--arch", choices=ARCHS, default="squeezenet1_0")
    p.add_argument("--weights", help="checkpoint (.safetensors, or a torch state_dict read with "
                                     "weights_only=True); default: random init")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--density", type=float, default=None, help="fraction of weights kept (default 0.33 "
                                                               "with the squeezenet preset)")
    p.add_argument("--bits", type=int, default=None, help="codebook bits 1-8")
    p.add_argument("--preset", choices=("squeezenet", "paper"), default="squeezenet")
    p.add_argument("--init", choices=("linear", "density", "random"), default="linear")
    p.add_argument("--block", type=int, default=1,
                   help="prune blocks of this many output channels together (1: unstructured; 4: "
                        "row quads, faster kernels)")
    p.add_argument("--index-bits", type=_index_bits, default="auto",
                   help="stored gap width 1-8 or 'auto' (per layer, smallest)")
    p.add_argument("--codebook-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compress)
    q = subparsers.add_parser("info", help="print the report of a .sqz file",
                              description="Print a .sqz file's per-layer sizes and compression stages.")
    q.add_argument("path")
    q.add_argument("--verify", action="store_true", help="also decode every stream and check CRCs")
    q.add_argument("--json", action="store_true", help="machine-readable report")
    q.set_defaults(func=cmd_info)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sqz_kernels.compression.cli")
    sub = ap.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
