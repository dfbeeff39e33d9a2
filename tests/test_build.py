"""The build registered what it says it built."""
import torch

import sqz_kernels as sk
from sqz_kernels import _build_info


def _has_kernel(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def test_cpu_kernel_registered():
    assert _has_kernel("sqz_kernels::fused_fire", "CPU")


def test_cuda_kernel_registered_iff_built():
    assert _has_kernel("sqz_kernels::fused_fire", "CUDA") == bool(_build_info.CUDA)


def test_isa_reported():
    assert sk.ops.cpu_isa() in ("avx512", "avx2", "scalar")


def test_parallel_regions_are_openmp():
    # at::parallel_for is a header-inline `#pragma omp parallel`: built without -fopenmp the
    # extension silently runs every kernel on one thread. The OpenMP runtime entry point must be
    # imported by the .so.
    import sqz_kernels._C as ext

    with open(ext.__file__, "rb") as f:
        assert b"GOMP_parallel" in f.read()
