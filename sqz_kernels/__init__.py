"""sqz_kernels: fused Fire-module and Deep Compression kernels for PyTorch."""
from . import ops
from .fire import EagerFire, FusedFire, fuse_fire_, is_fire_like, is_plain_fire
from .pool import MaxPool2d, fast_pool_
from . import models
from . import compression
from .compression import CompressionReport, compress, load, save
from .codebook import CodebookConv2d, CodebookFire, CodebookLinear, fold_pool_, fold_relu_
from .chain import KernelChain

__version__ = "0.1.0"
__all__ = ["ops", "models", "compression", "FusedFire", "EagerFire", "fuse_fire_", "is_fire_like", "is_plain_fire",
           "MaxPool2d", "fast_pool_",
           "compress", "save", "load", "CompressionReport", "CodebookConv2d", "CodebookLinear",
           "CodebookFire", "fold_relu_", "fold_pool_", "KernelChain"]
