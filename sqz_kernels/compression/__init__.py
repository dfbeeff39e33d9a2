"""Deep Compression (Han, Mao, Dally, ICLR 2016) for sqz_kernels models.

prune (magnitude, masks held) -> k-means weight sharing per layer -> centroid fine-tuning ->
Huffman-coded storage in a safetensors container (.sqz). See docs/compression.md.
"""
from .api import PRESETS, compress, compressible_layers, file_report, report, resident_bytes
from .container import load, read, read_metadata, save
from .finetune import FineTune, finetune
from .kmeans import kmeans_1d
from .prune import MaskHold, magnitude_mask
from .report import CompressionReport, LayerReport

__all__ = ["compress", "save", "load", "read", "read_metadata", "report", "file_report",
           "resident_bytes", "compressible_layers", "CompressionReport", "LayerReport", "FineTune",
           "finetune", "kmeans_1d", "magnitude_mask", "MaskHold", "PRESETS"]
