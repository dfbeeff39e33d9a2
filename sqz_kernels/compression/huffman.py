"""Canonical, length-limited Huffman coding of uint8 symbol streams, vectorised with numpy.

Why our own: the pure-Python Huffman packages on PyPI decode bit by bit in Python (seconds for
SqueezeNet's ~0.8 M symbols). Here a table is just the code length of every symbol (canonical
codes follow from the lengths), encoding is array arithmetic, and decoding is table lookup on
many independent lanes at once: the stream is cut into chunks of `chunk` symbols whose bit
lengths are stored (uint16 each), so all chunks of all streams advance together, one symbol
per numpy step.

Stream blob layout: [uint16 little-endian bit length of each chunk] [packed bits, MSB first].
"""
import heapq
from typing import List, Sequence, Tuple

import numpy as np

__all__ = ["MAX_LEN", "LUT_BUDGET", "code_lengths", "lengths_to_hex", "lengths_from_hex",
           "check_lengths", "encode", "decode_many", "encoded_bits"]

MAX_LEN = 15          # longest code: a stream's lookup table has 2**15 entries at most
MAX_CHUNK = 4096      # 4096 * 15 bits < 2**16, so a chunk's bit length fits a uint16
_PAD = 64 * MAX_LEN // 8 + 8


def code_lengths(freqs: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Huffman code lengths (uint8 per symbol, 0 for unused) limited to `max_len` bits. A lone
    symbol gets length 1. The length limit uses the JPEG (Annex K.3) adjustment, which keeps
    the code complete and changes lengths only in the rare deep trees."""
    freqs = np.asarray(freqs, dtype=np.int64)
    used = np.nonzero(freqs)[0]
    lengths = np.zeros(freqs.size, dtype=np.uint8)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths
    # plain Huffman tree; a tie-breaking counter keeps it deterministic
    heap = [(int(freqs[s]), i, [int(s)]) for i, s in enumerate(used)]
    heapq.heapify(heap)
    depth = np.zeros(freqs.size, dtype=np.int64)
    counter = len(heap)
    while len(heap) > 1:
        f1, _, a = heapq.heappop(heap)
        f2, _, b = heapq.heappop(heap)
        depth[a] += 1
        depth[b] += 1
        heapq.heappush(heap, (f1 + f2, counter, a + b))
        counter += 1
    if depth.max() > max_len:
        # count codes per length, then move the deepest pairs up (JPEG Annex K.3)
        bl = np.bincount(depth[used], minlength=int(depth.max()) + 1).astype(np.int64)
        for i in range(bl.size - 1, max_len, -1):
            while bl[i] > 0:
                j = i - 2
                while bl[j] == 0:
                    j -= 1
                bl[i] -= 2
                bl[i - 1] += 1
                bl[j + 1] += 2
                bl[j] -= 1
        # most frequent symbols get the shortest lengths
        order = used[np.argsort(-freqs[used], kind="stable")]
        lens = np.repeat(np.arange(bl.size), bl)[: order.size]
        depth[order] = lens
    lengths[used] = depth[used]
    return lengths


def check_lengths(lengths: np.ndarray, what: str = "Huffman table") -> None:
    """Valid canonical table: lengths in [0, MAX_LEN] and a prefix code (Kraft sum <= 1)."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or lengths.size > 256:
        raise ValueError(f"{what}: must list at most 256 symbol lengths")
    if lengths.size and int(lengths.max()) > MAX_LEN:
        raise ValueError(f"{what}: code length {int(lengths.max())} exceeds {MAX_LEN}")
    nz = lengths[lengths > 0].astype(np.int64)
    if nz.size and int(np.sum(1 << (MAX_LEN - nz))) > (1 << MAX_LEN):
        raise ValueError(f"{what}: code lengths violate the Kraft inequality (not a prefix code)")


def lengths_to_hex(lengths: np.ndarray) -> str:
    """One hex digit per symbol (lengths <= 15), trailing unused symbols dropped."""
    lengths = np.asarray(lengths, dtype=np.uint8)
    nz = np.nonzero(lengths)[0]
    end = int(nz[-1]) + 1 if nz.size else 0
    return "".join("0123456789abcdef"[v] for v in lengths[:end])


def lengths_from_hex(s: str, what: str = "Huffman table") -> np.ndarray:
    if not isinstance(s, str) or len(s) > 256:
        raise ValueError(f"{what}: must be a hex string of at most 256 digits")
    try:
        lengths = np.array([int(ch, 16) for ch in s], dtype=np.uint8)
    except ValueError:
        raise ValueError(f"{what}: not a hex string") from None
    check_lengths(lengths, what)
    return lengths


def _canonical_codes(lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(symbols sorted by (length, symbol), their canonical codes)."""
    syms = np.nonzero(lengths)[0]
    syms = syms[np.lexsort((syms, lengths[syms]))]
    lens = lengths[syms].astype(np.int64)
    codes = np.zeros(syms.size, dtype=np.int64)
    code = 0
    for i in range(1, syms.size):          # <= 256 iterations
        code = (code + 1) << int(lens[i] - lens[i - 1])
        codes[i] = code
    return syms, codes


def encoded_bits(freqs: np.ndarray, lengths: np.ndarray) -> int:
    return int(np.sum(np.asarray(freqs, np.int64) * np.asarray(lengths, np.int64)[: len(freqs)]))


def encode(symbols: np.ndarray, lengths: np.ndarray, chunk: int) -> bytes:
    """Blob for `symbols` (uint8) with the canonical code of `lengths`."""
    symbols = np.asarray(symbols, dtype=np.uint8)
    n = symbols.size
    if n == 0:
        return b""
    if int(symbols.max()) >= lengths.size or np.any(lengths[symbols] == 0):
        raise ValueError("encode: a symbol has no code in the table")
    syms, codes = _canonical_codes(lengths)
    code_of = np.zeros(256, dtype=np.int64)
    code_of[syms] = codes
    lens = lengths[symbols].astype(np.int64)
    vals = code_of[symbols]
    nchunks = -(-n // chunk)
    chunk_bits = np.add.reduceat(lens, np.arange(0, n, chunk))
    # bit matrix [n, MAX_LEN], MSB of each code first, then keep the first len bits of each row
    shifts = lens[:, None] - 1 - np.arange(MAX_LEN)[None, :]
    bits = (vals[:, None] >> np.maximum(shifts, 0)) & 1
    bits = bits[shifts >= 0].astype(np.uint8)
    packed = np.packbits(bits)
    assert chunk_bits.size == nchunks
    return chunk_bits.astype("<u2").tobytes() + packed.tobytes()


# Lookup-table entries (int32) per decoding batch: streams are decoded in batches whose tables
# (2**w entries for a stream whose longest code has w bits) fit this, so a file of many tiny
# streams with 15-bit codes cannot make the tables outgrow the file by orders of magnitude.
LUT_BUDGET = 1 << 22


def decode_many(streams: Sequence[Tuple[bytes, np.ndarray, int]], chunk: int,
                what: Sequence[str] = ()) -> List[np.ndarray]:
    """Decode several blobs at once. streams: (blob, lengths, number of symbols). Every chunk of
    every stream is a lane; each numpy step decodes one symbol in every lane of a batch of
    streams. Raises ValueError on any inconsistency (blob size, an invalid code, a chunk that
    does not end exactly at its declared bit length). Memory: the outputs, a few int64 per
    chunk, the payload, and at most LUT_BUDGET table entries."""
    if not isinstance(chunk, int) or not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"chunk must be an int in [1, {MAX_CHUNK}], got {chunk!r}")
    outs = [np.zeros(int(n), dtype=np.uint8) for _, _, n in streams]
    names = list(what) + [f"stream {i}" for i in range(len(what), len(streams))]
    batch, batch_lut = [], 0
    for i, (blob, lengths, n) in enumerate(streams):
        check_lengths(lengths, f"{names[i]}: Huffman table")
        n = int(n)
        if n == 0:
            if len(blob):
                raise ValueError(f"{names[i]}: declares 0 symbols but holds {len(blob)} bytes")
            continue
        used = lengths[lengths > 0]
        if used.size == 0:
            raise ValueError(f"{names[i]}: Huffman table is empty but {n} symbols are declared")
        size = 1 << int(used.max())
        if batch and batch_lut + size > LUT_BUDGET:
            _decode_batch(batch, streams, outs, chunk, names)
            batch, batch_lut = [], 0
        batch.append(i)
        batch_lut += size
    if batch:
        _decode_batch(batch, streams, outs, chunk, names)
    return outs


def _decode_batch(batch: List[int], streams, outs: List[np.ndarray], chunk: int,
                  names: List[str]) -> None:
    """Decodes streams[i] into outs[i] for i in batch (each with symbols and a non-empty table)."""
    lane_start, lane_end, lane_count, lane_out, lane_table, lane_width = [], [], [], [], [], []
    bufs, luts = [], []
    bit_base = out_base = lut_base = 0
    for i in batch:
        blob, lengths, n = streams[i]
        n = int(n)
        nchunks = -(-n // chunk)
        if len(blob) < 2 * nchunks:
            raise ValueError(f"{names[i]}: {len(blob)} bytes cannot hold {nchunks} chunk headers")
        cb = np.frombuffer(blob, dtype="<u2", count=nchunks).astype(np.int64)
        nbits = int(cb.sum())
        payload = blob[2 * nchunks:]
        if len(payload) != -(-nbits // 8):
            raise ValueError(f"{names[i]}: holds {len(payload)} payload bytes, its chunk headers "
                             f"declare {nbits} bits")
        used = lengths[lengths > 0]
        counts = np.full(nchunks, chunk, dtype=np.int64)
        counts[-1] = n - chunk * (nchunks - 1)
        if np.any(cb < counts * int(used.min())) or np.any(cb > counts * int(used.max())):
            raise ValueError(f"{names[i]}: a chunk's bit length is impossible for its symbol count")
        # the stream's table: 2**width entries (code length << 8) | symbol; length 0 marks a bit
        # pattern that is no code (such a lane stalls and fails the end check below)
        width = int(used.max())
        lut = np.zeros(1 << width, dtype=np.int32)
        syms, codes = _canonical_codes(lengths)
        lens = lengths[syms].astype(np.int64)
        spans = 1 << (width - lens)
        lo = codes << (width - lens)
        idx = np.repeat(lo - np.cumsum(spans) + spans, spans) + np.arange(int(spans.sum()))
        lut[idx] = np.repeat((lens << 8) | syms, spans)
        starts = bit_base + np.concatenate([[0], np.cumsum(cb)[:-1]])
        lane_start.append(starts)
        lane_end.append(starts + cb)
        lane_count.append(counts)
        lane_out.append(out_base + np.arange(nchunks, dtype=np.int64) * chunk)
        lane_table.append(np.full(nchunks, lut_base, dtype=np.int64))
        lane_width.append(np.full(nchunks, width, dtype=np.int64))
        luts.append(lut)
        bufs.append(np.frombuffer(payload, dtype=np.uint8))
        bit_base += 8 * len(payload)
        out_base += n
        lut_base += lut.size
    lut = np.concatenate(luts)
    payload = np.concatenate(bufs)
    # 24-bit big-endian window starting at every byte (>= 7 + 15 bits needed); the zero padding
    # absorbs lanes that overrun between two overrun checks (<= 64 steps * 15 bits = 120 bytes)
    padded = np.concatenate([payload, np.zeros(_PAD, dtype=np.uint8)]).astype(np.int32)
    w24 = (padded[:-2] << 16) | (padded[1:-1] << 8) | padded[2:]
    limit = 8 * payload.size
    pos = np.concatenate(lane_start)
    end = np.concatenate(lane_end)
    cnt = np.concatenate(lane_count)
    outp = np.concatenate(lane_out)
    tab = np.concatenate(lane_table)
    width = np.concatenate(lane_width)
    # longest lanes first, so the lanes still active at step t are a prefix
    order = np.argsort(-cnt, kind="stable")
    pos, end, cnt, outp, tab, width = (a[order] for a in (pos, end, cnt, outp, tab, width))
    shift = 24 - width
    mask = (1 << width) - 1
    steps = int(cnt.max())
    n_active = cnt.size - np.searchsorted(np.sort(cnt), np.arange(steps), side="right")
    flat = np.zeros(out_base, dtype=np.uint8)
    for t in range(steps):
        a = int(n_active[t])
        p = pos[:a]
        e = lut[tab[:a] + ((w24[p >> 3] >> (shift[:a] - (p & 7))) & mask[:a])]
        flat[outp[:a] + t] = e & 0xFF          # lane l's t-th symbol
        p += e >> 8
        if t % 64 == 63 and int(p.max()) > limit:
            raise ValueError("Huffman stream runs past its end (corrupt stream or table)")
    if not np.array_equal(pos, end):
        raise ValueError("Huffman stream: a chunk does not end at its declared bit length "
                         "(corrupt stream or table)")
    base = 0
    for i in batch:
        n = int(streams[i][2])
        outs[i] = flat[base: base + n]
        base += n
