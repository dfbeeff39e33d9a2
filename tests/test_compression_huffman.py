"""Canonical Huffman coder: round trips, length limit, corrupt input detection."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sqz_kernels.compression import huffman as H


def _roundtrip(streams, chunk):
    jobs, blobs = [], []
    for s in streams:
        lengths = H.code_lengths(np.bincount(s, minlength=256))
        blob = H.encode(s, lengths, chunk)
        assert len(blob) == 2 * -(-s.size // chunk) + -(-H.encoded_bits(np.bincount(s, minlength=256), lengths) // 8) \
            or s.size == 0
        jobs.append((blob, lengths, s.size))
    return H.decode_many(jobs, chunk)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=4),
       alphabet=st.integers(1, 256), skew=st.floats(0.0, 3.0), chunk=st.sampled_from([1, 7, 64, 2048, 4096]),
       seed=st.integers(0, 2 ** 16))
def test_roundtrip_many_streams(sizes, alphabet, skew, chunk, seed):
    rng = np.random.default_rng(seed)
    p = np.exp(-skew * np.arange(alphabet, dtype=float))
    streams = [rng.choice(alphabet, size=n, p=p / p.sum()).astype(np.uint8) for n in sizes]
    outs = _roundtrip(streams, chunk)
    for a, b in zip(outs, streams):
        assert np.array_equal(a, b)


def test_lengths_optimal_and_limited():
    f = np.array([45, 13, 12, 16, 9, 5])              # textbook example: lengths 1,3,3,3,4,4
    assert sorted(H.code_lengths(f)[:6].tolist()) == [1, 3, 3, 3, 4, 4]
    fib = np.array([1, 1] + [0] * 0)
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    L = H.code_lengths(np.array(fib))                 # unlimited depth would be 39
    assert L.max() == H.MAX_LEN
    H.check_lengths(L)
    assert np.sum(2.0 ** -L[L > 0].astype(float)) == pytest.approx(1.0)
    assert H.code_lengths(np.array([0, 5, 0])).tolist() == [0, 1, 0]   # lone symbol: 1 bit


def test_hex_table_roundtrip_and_rejects():
    L = H.code_lengths(np.bincount(np.arange(200) % 37, minlength=256))
    assert np.array_equal(H.lengths_from_hex(H.lengths_to_hex(L)), L[:37])
    for bad in ("1g", "11111", "f" * 257, 12):
        with pytest.raises(ValueError):
            H.lengths_from_hex(bad)


def test_decode_detects_corruption():
    rng = np.random.default_rng(0)
    s = rng.geometric(0.3, 5000).clip(max=200).astype(np.uint8)
    L = H.code_lengths(np.bincount(s, minlength=256))
    blob = bytearray(H.encode(s, L, 512))
    with pytest.raises(ValueError):                    # payload size does not match the headers
        H.decode_many([(bytes(blob[:-1]), L, s.size)], 512)
    blob2 = bytearray(blob)
    blob2[0] ^= 0x01                                   # a chunk header changes by one bit
    with pytest.raises(ValueError):
        H.decode_many([(bytes(blob2), L, s.size)], 512)
    # an incomplete table: some bit patterns are no code
    L2 = L.copy()
    L2[int(np.argmin(np.where(L2 > 0, L2, 99)))] += 1
    try:
        out = H.decode_many([(bytes(blob), L2, s.size)], 512)[0]
        assert not np.array_equal(out, s)
    except ValueError:
        pass
