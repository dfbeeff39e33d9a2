"""The compress / info subcommands, wired into a parser the way the package CLI does."""
import argparse

import torch

from sqz_kernels.compression import cli


def run(argv):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    cli.add_subcommands(sub)
    args = ap.parse_args(argv)
    return args.func(args)


def test_compress_then_info(tmp_path, capsys):
    import sqz_kernels as sk
    from safetensors.torch import save_file
    ck = tmp_path / "w.safetensors"
    torch.manual_seed(3)
    save_file(sk.models.squeezenet1_1(num_classes=10).state_dict(), str(ck))
    out = tmp_path / "n.sqz"
    assert run(["compress", "--arch", "squeezenet1_1", "--num-classes", "10", "--weights", str(ck),
                "--density", "0.33", "--bits", "6", "-o", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "+Huffman" in text and "file (.sqz)" in text and out.exists()
    assert run(["info", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "verified" in text and "features.3.expand3x3" in text
    assert run(["info", str(out), "--json"]) == 0
    assert '"stages"' in capsys.readouterr().out


def test_errors_exit_nonzero(tmp_path, capsys):
    assert run(["info", str(tmp_path / "missing.sqz")]) == 2
    bad = tmp_path / "bad.sqz"
    bad.write_bytes(b"\x00" * 20)
    assert run(["info", str(bad)]) == 2
    assert "invalid .sqz file" in capsys.readouterr().err
    assert run(["compress", "--density", "1.5", "-o", str(tmp_path / "x.sqz"), "-q"]) == 2
    assert "density" in capsys.readouterr().err


def test_compress_block_option(tmp_path, capsys):
    from sqz_kernels.codebook import CodebookConv2d
    from sqz_kernels.compression import load
    import sqz_kernels as sk
    out = tmp_path / "q.sqz"
    assert run(["compress", "--arch", "squeezenet1_1", "--num-classes", "10", "--block", "4",
                "-o", str(out), "-q"]) == 0
    m = load(out, sk.models.squeezenet1_1(num_classes=10))
    conv = m.features[3].expand3x3
    assert isinstance(conv, CodebookConv2d)
    counts = conv.row_counts.tolist()
    assert counts[0::4] == counts[1::4] == counts[2::4] == counts[3::4]   # blocks of 4 rows
    assert run(["compress", "--block", "0", "-o", str(tmp_path / "x.sqz"), "-q"]) == 2
    assert "block" in capsys.readouterr().err
