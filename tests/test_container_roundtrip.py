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


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_file_whose_fire_is_not_a_fire_leaves_the_model_untouched(tmp_path):
    # The three convs are swapped only after the Fire they form has been assembled: a file that
    # names a module with a stride-2 expand3x3 as a Fire once left it half converted.
    class NotAFire(nn.Module):
        def __init__(self):
            super().__init__()
            self.squeeze = nn.Conv2d(8, 4, 1)
            self.expand1x1 = nn.Conv2d(4, 8, 1)
            self.expand3x3 = nn.Conv2d(4, 8, 3, padding=1, stride=2)

        def forward(self, x):
            x = self.squeeze(x)
            return self.expand1x1(x)[..., ::2, ::2] + self.expand3x3(x)

    torch.manual_seed(0)
    net = nn.Sequential(NotAFire())
    C.compress(net, density=0.5, bits=4, progress=False)
    from test_container_fuzz import rebuild, split
    C.save(net, tmp_path / "x.sqz")
    meta, tensors = split((tmp_path / "x.sqz").read_bytes())
    meta["fires"].append("0")
    target = nn.Sequential(NotAFire())
    before = _state(target)
    with pytest.raises(ValueError, match="Fire '0'.*do not form a Fire"):
        C.load(rebuild(meta, tensors), target)
    assert all(type(c) is nn.Conv2d for c in target[0].children())
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_a_file_of_one_layer_loads_into_that_layer(tmp_path, kind):
    # The layer is the whole model (name ''): it cannot be swapped, so it loads only into a
    # Codebook layer, which takes the streams (it was once skipped silently: 0 entries loaded).
    torch.manual_seed(1)
    if kind == "conv":
        dense = nn.Conv2d(4, 8, 3, padding=1)
        layer = sk.CodebookConv2d.from_conv(dense, bits=4)
        fresh = sk.CodebookConv2d(4, 8, 3, padding=1, bits=3)
        x = torch.randn(2, 4, 6, 6)
    else:
        dense = nn.Linear(10, 7)
        layer = sk.CodebookLinear.from_linear(dense, bits=4)
        fresh = sk.CodebookLinear(10, 7, bits=3)
        x = torch.randn(2, 10)
    p = tmp_path / "one.sqz"
    C.save(layer, p)
    assert C.load(p, fresh) is fresh
    _same_state(fresh, layer)
    assert fresh.bits == 4
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
    before = _state(dense)
    with pytest.raises(ValueError, match="whole model"):
        C.load(p, dense)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())


def test_a_file_of_one_fire_loads_into_a_codebook_fire(tmp_path):
    def codebook_fire():
        f = sk.fire.EagerFire(8, 4, 6, 6)
        return CodebookFire.from_codebook_convs(
            *(sk.CodebookConv2d.from_conv(c, bits=4) for c in (f.squeeze, f.expand1x1, f.expand3x3)))

    torch.manual_seed(2)
    fire = codebook_fire()
    p = tmp_path / "fire.sqz"
    C.save(fire, p)
    target = codebook_fire()
    C.load(p, target)
    _same_state(target, fire)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        assert torch.equal(target(x), fire(x))
    eager = sk.fire.EagerFire(8, 4, 6, 6)
    with pytest.raises(ValueError, match="CodebookFire"):
        C.load(p, eager)
    assert all(type(c) is nn.Conv2d for c in (eager.squeeze, eager.expand1x1, eager.expand3x3))


def test_dense_tensors_of_another_kind_of_dtype_are_refused(tmp_path):
    net = _compressed()
    p = tmp_path / "n.sqz"
    C.save(net, p)
    from test_container_fuzz import rebuild, split
    for dtype in (torch.complex64, torch.bool, torch.int32):
        meta, tensors = split(p.read_bytes())
        tensors["fire.squeeze.bias"] = tensors["fire.squeeze.bias"].to(dtype)
        target = Net()
        with pytest.raises(ValueError, match="fire.squeeze.bias.*dtype"):
            C.load(rebuild(meta, tensors), target)
        assert isinstance(target.conv, nn.Conv2d)
    # float64 into a float32 model is a cast, as load_state_dict does
    meta, tensors = split(p.read_bytes())
    tensors["fire.squeeze.bias"] = tensors["fire.squeeze.bias"].double()
    target = C.load(rebuild(meta, tensors), Net())
    assert torch.equal(target.fire.squeeze.bias, net.fire.squeeze.bias)
    meta, tensors = split(p.read_bytes())
    tensors["bn.num_batches_tracked"] = tensors["bn.num_batches_tracked"].float()
    with pytest.raises(ValueError, match="num_batches_tracked.*dtype"):
        C.load(rebuild(meta, tensors), Net())


def test_file_report_refuses_malformed_tensor_entries(tmp_path):
    import json
    import struct
    net = _compressed()
    p = tmp_path / "n.sqz"
    C.save(net, p)
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if not k.startswith("__"))
    for bad in ([], [0, None], [5, 2], "x"):
        header[key]["data_offsets"] = bad
        hb = json.dumps(header).encode()
        q = tmp_path / "bad.sqz"
        q.write_bytes(struct.pack("<Q", len(hb)) + hb + data[8 + n:])
        with pytest.raises(ValueError, match="data_offsets"):
            C.file_report(q)
