"""The .sqz container: exact round trips, loading into dense or compressed models, info."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sqz_kernels as sk
from sqz_kernels import compression as C
from sqz_kernels.codebook import CodebookConv2d, CodebookFire, CodebookLinear


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.fire = sk.fire.EagerFire(12, 4, 8, 8)
        self.fc = nn.Linear(16, 5, bias=False)

    def forward(self, x):
        x = self.fire(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def _compressed(seed=0, **kw):
    torch.manual_seed(seed)
    net = Net()
    net.bn.running_mean.uniform_()
    C.compress(net, progress=False, **{"density": 0.3, "bits": 5, **kw})
    return net.eval()


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("index_bits", [1, 3, 8, "auto"])
def test_roundtrip_exact_into_dense_model(tmp_path, index_bits):
    net = _compressed()
    p = tmp_path / "n.sqz"
    size = C.save(net, p, index_bits=index_bits)
    assert size == p.stat().st_size
    fresh = Net().eval()
    C.load(p, fresh)
    assert isinstance(fresh.fire, CodebookFire) and isinstance(fresh.fc, CodebookLinear)
    _same_state(net, fresh)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), fresh(x))


def test_load_into_compressed_model_and_fp16_codebooks(tmp_path):
    net = _compressed()
    p = tmp_path / "n.sqz"
    C.save(net, p, codebook_dtype="float16")
    other = _compressed(seed=1)
    C.load(p, other)
    for n, m in net.named_modules():
        if isinstance(m, (CodebookConv2d, CodebookLinear)):
            o = other.get_submodule(n)
            assert torch.equal(o.codes, m.codes) and torch.equal(o.gaps, m.gaps)
            assert torch.equal(o.codebook.detach(), m.codebook.detach().half().float())


def test_model_mismatch_is_a_value_error(tmp_path):
    net = _compressed()
    p = tmp_path / "n.sqz"
    C.save(net, p)

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 6, bias=False)
    with pytest.raises(ValueError, match="fc"):
        C.load(p, Wider())

    class Extra(Net):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="lacks"):
        C.load(p, Extra())
    C.load(p, Extra(), strict=False)
    untouched = Net()
    with pytest.raises(ValueError):
        C.load(p, nn.Sequential(nn.Linear(2, 2)))
    assert isinstance(untouched.conv, nn.Conv2d)


def test_file_report_matches_model_report(tmp_path):
    net = _compressed()
    r = C.report(net)
    p = tmp_path / "n.sqz"
    C.save(net, p)
    fr = C.file_report(p)
    assert fr.stages() == r.stages() and fr.file_bytes == p.stat().st_size
    assert [l.name for l in fr.layers] == [l.name for l in r.layers]


def test_squeezenet_file_size_and_decode_time(tmp_path):
    import time
    torch.manual_seed(0)
    m = sk.models.squeezenet1_0()
    C.compress(m, preset="squeezenet", progress=False)
    p = tmp_path / "sq.sqz"
    size = C.save(m, p)
    assert size <= 470_000
    t = time.perf_counter()
    C.read(p)
    assert time.perf_counter() - t < 3.0      # < 1 s when the machine is idle; slack for CI load
    fresh = sk.models.squeezenet1_0().eval()
    C.load(p, fresh)
    _same_state(m, fresh)


def test_no_pickle_in_file(tmp_path):
    net = _compressed()
    p = tmp_path / "n.sqz"
    C.save(net, p)
    data = p.read_bytes()
    assert b"\x80\x04" not in data[:64] and data[8:9] == b"{"      # safetensors JSON header
    from safetensors import safe_open
    with safe_open(str(p), "pt") as f:
        assert "sqz" in f.metadata()


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=15, deadline=None)
@given(o=st.integers(1, 9), i=st.integers(1, 40), k=st.sampled_from([1, 3]),
       density=st.sampled_from([0.001, 0.05, 0.3, 1.0]), bits=st.integers(1, 8),
       index_bits=st.sampled_from([1, 2, 5, 8, "auto"]), chunk=st.sampled_from([1, 16, 2048]),
       seed=st.integers(0, 1000))
def test_property_roundtrip_random_layers(o, i, k, density, bits, index_bits, chunk, seed):
    import os
    import tempfile
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2), nn.Flatten(), nn.Linear(o * 4, 3))
    C.compress(net, density=density, bits=bits, progress=False)
    fd, path = tempfile.mkstemp(suffix=".sqz")
    os.close(fd)
    C.save(net, path, index_bits=index_bits, chunk=chunk)
    fresh = nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2), nn.Flatten(), nn.Linear(o * 4, 3))
    try:
        C.load(path, fresh)
    finally:
        os.remove(path)
    _same_state(net, fresh)


def test_block_pruned_roundtrip(tmp_path):
    # block pruning changes only which weights survive: the file format and its round trip are
    # the same, and the loaded streams keep their shared row quads
    net = _compressed(block=4)
    p = tmp_path / "q.sqz"
    C.save(net, p)
    fresh = C.load(p, Net().eval())
    _same_state(net, fresh)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), fresh(x))
