"""Fast accuracy check on real data (scikit-learn's digits at 32x32): a briefly trained
SqueezeNet 1.0 keeps its accuracy through 33 % / 6-bit compression with retraining and centroid
fine-tuning, and through the .sqz file. The full version (longer training, all rows, the
<= 0.5-point target) is bench/compress_digits.py."""
import copy
import importlib.util
import os

import torch
import torch.nn.functional as F

from sqz_kernels import compression as C

_BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "compress_digits.py")


def _bench():
    spec = importlib.util.spec_from_file_location("compress_digits", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_digits_compress_keeps_accuracy(tmp_path):
    b = _bench()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        xtr, ytr, xte, yte = b.digits_tensors(32)
        base = b.make_model(train_init=True)
        steps = 3 * len(ytr) // 32
        b.train(base, xtr, ytr, steps, lr=1e-3, bs=32)
        acc = b.accuracy(base, xte, yte)
        assert acc >= 75.0, f"baseline trained to only {acc:.1f} %"
        m = copy.deepcopy(base)
        ft = lambda: C.FineTune(b.Loader(xtr, ytr, 32, steps // 3, 1), F.cross_entropy, steps // 3,  # noqa: E731
                                lr=1e-4, progress=False)
        rep = C.compress(m, preset="squeezenet", prune_finetune=ft(), finetune=ft(), progress=False)
        assert rep.stages()["+Huffman"] < rep.stages()["dense"] / 10
        C.save(m, tmp_path / "d.sqz")
        m2 = C.load(tmp_path / "d.sqz", b.make_model())
        acc_c = b.accuracy(m2, xte, yte)
        # a short training leaves the baseline noisy; the full bench holds the 0.5-point target
        assert acc_c >= acc - 2.0, f"compressed {acc_c:.2f} % vs dense {acc:.2f} %"
    finally:
        torch.set_num_threads(threads)
