"""The CLI demo and bench run end to end (small, fast variants)."""
import torch

from sqz_kernels.cli import main


def test_demo_runs(capsys):
    assert main(["demo", "--rounds", "1", "--budget", "0.05", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "swapped 8 Fire modules" in out and "whole network" in out and "fire9" in out


def test_demo_channels_last_and_weights(tmp_path, capsys):
    torch.manual_seed(5)
    from sqz_kernels import models
    from sqz_kernels.fire import EagerFire

    ckpt = tmp_path / "w.pth"
    torch.save(models.squeezenet1_0(fire_cls=EagerFire).state_dict(), ckpt)
    assert main(["demo", "--arch", "squeezenet1_0", "--weights", str(ckpt), "--format", "channels_last",
                 "--rounds", "1", "--budget", "0.05", "--threads", "1"]) == 0
    assert "squeezenet1_0" in capsys.readouterr().out


def test_bench_writes_plot(tmp_path, capsys):
    png = tmp_path / "s.png"
    assert main(["bench", "--rounds", "1", "--budget", "0.05", "--threads", "1", "--plot", str(png)]) == 0
    assert png.stat().st_size > 1000
