"""Build of sqz_kernels._C.

CPU kernels are always built. CUDA kernels are added when torch is a CUDA build and a CUDA toolkit
(nvcc) is found; the decision depends on the toolkit, never on a visible GPU.

Environment:
  SQZ_CUDA=0 / 1      force a CPU-only build / demand CUDA (fails with a clear message if impossible)
  SQZ_CPU_ARCH        value for -march= (default "native": the widest SIMD of the build machine;
                      e.g. "x86-64-v3" for a portable AVX2 build, "x86-64" for scalar only)
  TORCH_CUDA_ARCH_LIST  CUDA architectures; default "8.0;9.0" when no GPU is visible
  MAX_JOBS            parallel compile jobs (honoured by torch's ninja build)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The real CUDA toolkit: CUDA_HOME if set, else the toolkit behind nvcc.

    On some machines /usr/local/bin/nvcc is a wrapper script, so torch's guess (dirname of nvcc's
    directory = /usr/local) is wrong; we look for a directory that has bin/nvcc and include/cuda.h.
    """
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isfile(
            os.path.join(c, "include", "cuda.h")
        ):
            return c
    return None


def extra_cuda_includes():
    """Headers that torch's CUDA headers include but a minimal toolkit may lack (e.g. cusparse.h)
    ship in the nvidia-* wheels torch depends on."""
    dirs = []
    for sp in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            d = os.path.join(sp, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
        for d in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include"))):
            if d not in dirs:
                dirs.append(d)
    return dirs


def want_cuda():
    flag = os.environ.get("SQZ_CUDA", "").strip()
    if flag == "0":
        return False, None
    cuda_home = find_cuda_home() if torch.version.cuda else None
    if flag == "1":
        if not torch.version.cuda:
            sys.exit("SQZ_CUDA=1 but the installed torch is a CPU-only build (torch.version.cuda is None)")
        if cuda_home is None:
            sys.exit("SQZ_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME to a directory with bin/nvcc)")
    return cuda_home is not None, cuda_home


use_cuda, cuda_home = want_cuda()
if use_cuda:
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # torch caches its guess at import time
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

march = os.environ.get("SQZ_CPU_ARCH", "native")
# Release objects: no -g (Python's default CFLAGS carry it and make the .so ten times larger).
# -fopenmp: at::parallel_for is a header-inline `#pragma omp parallel` (torch's OpenMP backend), so
# without it every parallel region of ours silently runs on one thread.
cxx_flags = ["-O3", f"-march={march}", "-g0", "-fno-math-errno", "-fopenmp"]  # -std: torch picks
# No --use_fast_math: the fp32 path must stay IEEE-exact FFMA. -Xptxas=-v reports registers/spills.
nvcc_flags = ["-O3", "-Xptxas=-v", "-lineinfo"]

sources = ["csrc/registration.cpp", "csrc/python_calls.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
include_dirs = [os.path.join(HERE, "csrc")]
define_macros = []
if use_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs += extra_cuda_includes()
    define_macros.append(("SQZ_WITH_CUDA", "1"))
    Ext = cpp_extension.CUDAExtension
    extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
else:
    Ext = cpp_extension.CppExtension
    extra = {"cxx": cxx_flags}

ext = Ext(
    name="sqz_kernels._C",
    sources=sources,
    include_dirs=include_dirs,
    define_macros=define_macros,
    extra_compile_args=extra,
    extra_link_args=["-s", "-fopenmp"],
    py_limited_api=False,
)


class Build(cpp_extension.BuildExtension):
    def build_extensions(self):
        # Strip the -g that Python's sysconfig puts into every compile line.
        for attr in ("compiler_so", "compiler_cxx", "compiler"):
            cmd = getattr(self.compiler, attr, None)
            if isinstance(cmd, list):
                setattr(self.compiler, attr, [a for a in cmd if a != "-g"])
        print(f"sqz_kernels: CUDA={'on (' + cuda_home + ')' if use_cuda else 'off'}, "
              f"-march={march}, arch list={os.environ.get('TORCH_CUDA_ARCH_LIST', '-')}")
        with open(os.path.join(HERE, "sqz_kernels", "_build_info.py"), "w") as f:
            f.write("# Written by setup.py at build time.\n"
                    f"CUDA = {use_cuda!r}\n"
                    f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST') if use_cuda else None!r}\n"
                    f"CPU_ARCH = {march!r}\n"
                    f"TORCH_VERSION = {torch.__version__!r}\n")
        super().build_extensions()


setup(
    packages=find_packages(include=["sqz_kernels", "sqz_kernels.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
