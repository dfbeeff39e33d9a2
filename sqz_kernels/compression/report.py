"""CompressionReport: per-layer sizes and Deep Compression's four stages.

Stages (bytes; every stage also counts the parameters left dense, e.g. biases, as they are):
  dense              every weight fp32
  pruned             surviving weights fp32 + fixed-width relative index (index_bits per gap symbol)
  pruned+quantized   codes at `bits` bits + fixed-width index + codebooks
  +Huffman           Huffman-coded index and code streams (chunk headers included) + codebooks
The file adds the container's header (JSON metadata, Huffman tables); `file_bytes` is measured.
"""
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

__all__ = ["LayerReport", "CompressionReport"]


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: List[int]
    params: int
    nnz: int
    bits: int
    n: int                      # centroids in the codebook (<= 2**bits)
    index_bits: int             # storage index width
    index_symbols: int          # gap symbols, fillers included
    index_bytes: int            # Huffman-coded gap stream
    codes_bytes: int            # Huffman-coded code stream
    codebook_bytes: int
    resident_bytes: int = 0     # in memory: 2 per resident entry + codebook + row_counts (bias: other_bytes)

    @property
    def density(self) -> float:
        return self.nnz / self.params if self.params else 0.0

    @property
    def total_bytes(self) -> int:
        return self.index_bytes + self.codes_bytes + self.codebook_bytes

    @property
    def ratio(self) -> float:
        return 4 * self.params / max(1, self.total_bytes)


@dataclass
class CompressionReport:
    layers: List[LayerReport]
    other_bytes: int            # parameters/buffers kept dense (biases, ...), as stored
    codebook_dtype: str = "float32"
    file_bytes: Optional[int] = None
    skipped: List[str] = field(default_factory=list)   # layers left dense (unsupported geometry)

    def stages(self) -> Dict[str, int]:
        L = self.layers
        o = self.other_bytes
        idx = sum(math.ceil(x.index_symbols * x.index_bits / 8) for x in L)
        return {
            "dense": sum(4 * x.params for x in L) + o,
            "pruned": sum(4 * x.nnz for x in L) + idx + o,
            "pruned+quantized": sum(math.ceil(x.nnz * x.bits / 8) + x.codebook_bytes for x in L) + idx + o,
            "+Huffman": sum(x.total_bytes for x in L) + o,
        }

    @property
    def compressed_bytes(self) -> int:
        return self.stages()["+Huffman"]

    @property
    def ratio(self) -> float:
        s = self.stages()
        return s["dense"] / max(1, s["+Huffman"])

    @property
    def resident_bytes(self) -> int:
        return sum(x.resident_bytes for x in self.layers) + self.other_bytes

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["stages"] = self.stages()
        return d

    def __str__(self) -> str:
        rows = [f"{'layer':<28}{'shape':>18}{'params':>10}{'density':>9}{'bits':>5}{'n':>5}"
                f"{'idx b':>6}{'index B':>9}{'codes B':>9}{'cbook B':>8}{'total B':>9}{'ratio':>7}"]
        for x in self.layers:
            rows.append(f"{x.name:<28}{'x'.join(map(str, x.shape)):>18}{x.params:>10}{x.density:>9.3f}"
                        f"{x.bits:>5}{x.n:>5}{x.index_bits:>6}{x.index_bytes:>9}{x.codes_bytes:>9}"
                        f"{x.codebook_bytes:>8}{x.total_bytes:>9}{x.ratio:>6.1f}x")
        params = sum(x.params for x in self.layers)
        nnz = sum(x.nnz for x in self.layers)
        rows.append(f"{'total (' + str(len(self.layers)) + ' layers)':<28}{'':>18}{params:>10}"
                    f"{nnz / max(1, params):>9.3f}")
        rows.append(f"dense parameters kept as they are: {self.other_bytes} B")
        s = self.stages()
        rows.append("stage                   bytes      MB   ratio vs dense")
        for k, v in s.items():
            rows.append(f"{k:<18}{v:>12}{v / 1e6:>8.3f}   {s['dense'] / max(1, v):>6.1f}x")
        if self.file_bytes is not None:
            rows.append(f"{'file (.sqz)':<18}{self.file_bytes:>12}{self.file_bytes / 1e6:>8.3f}   "
                        f"{s['dense'] / max(1, self.file_bytes):>6.1f}x")
        if self.skipped:
            rows.append(f"left dense (unsupported): {', '.join(self.skipped)}")
        return "\n".join(rows)
