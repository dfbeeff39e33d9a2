"""sqz_kernels: fused Fire-module and Deep Compression kernels for PyTorch."""
from . import ops
from .fire import EagerFire, FusedFire, fuse_fire_, is_fire_like
from . import models

__version__ = "0.1.0"
__all__ = ["ops", "models", "FusedFire", "EagerFire", "fuse_fire_", "is_fire_like"]
