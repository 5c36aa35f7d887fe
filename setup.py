"""Build script: the pure-Python package always; the compiled extension ``pcdeq_kernels._C`` when its
sources exist under ``csrc/`` and a C++ compiler and torch are present.

Environment:
    PCDEQ_NO_EXT=1                 build the pure-Python package only.
    PCDEQ_LOCAL_VERSION=LABEL      append +LABEL to the version (scripts/build_wheels.sh: cpu.torch2.13, ...).
    PCDEQ_FORCE_CUDA=1             build the CUDA kernels (csrc/cuda/*.cu) even if the auto-detection below
                                   says no (e.g. on a machine without a GPU); fails if nvcc is missing.
                                   Without it they are built when torch is a CUDA build (torch.version.cuda)
                                   and CUDA_HOME (or torch's guess of it) holds bin/nvcc and the headers.
    PCDEQ_NO_CUDA=1                never build the CUDA kernels.
    TORCH_CUDA_ARCH_LIST           GPU targets of the CUDA build; default "8.0;9.0+PTX" (sm_80 is the minimum).
    PCDEQ_PTXAS_VERBOSE=1          pass -Xptxas -v to nvcc (registers, spills, shared memory per kernel).
    MAX_JOBS                       parallel compile jobs (torch's BuildExtension, with ninja).
    PCDEQ_CPU_CAPABILITY=LEVEL     SIMD level of the C++ CPU kernels: "default" (portable), "avx2" or
                                   "avx512". Unset: the best level torch uses on the build machine, as
                                   with -march=native (set "default" or "avx2" to build for other CPUs).
"""

import glob
import os
import platform
import re
import shutil

from setuptools import setup


# ATen's at::vec::Vectorized (the fused pass's SIMD) picks its AVX2 or AVX-512 implementation from
# these macros, the way torch compiles its own CPU kernels once per level.
SIMD_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def simd_flags():
    level = os.environ.get("PCDEQ_CPU_CAPABILITY", "").lower()
    if level:
        if level not in SIMD_FLAGS:
            raise SystemExit(f"PCDEQ_CPU_CAPABILITY={level!r}: choose one of {sorted(SIMD_FLAGS)}")
    elif platform.machine().lower() in ("x86_64", "amd64"):
        import torch

        # what torch's dispatcher uses on this machine: "AVX512", "AVX2", "DEFAULT", ...
        level = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "default")
    else:
        level = "default"
    print(f"pcdeq_kernels: building the CPU kernels for SIMD level {level!r}")
    return SIMD_FLAGS[level]


def cuda_build_wanted(cuda_sources):
    """Whether to compile csrc/cuda/*.cu as well (see the module docstring)."""
    if not cuda_sources or os.environ.get("PCDEQ_NO_CUDA") == "1":
        return False
    forced = os.environ.get("PCDEQ_FORCE_CUDA") == "1"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    # CUDA_HOME as torch resolved it (the CUDA_HOME/CUDA_PATH variables, else the directory above the
    # first nvcc on PATH, else /usr/local/cuda): it must hold the compiler and the runtime headers, or a
    # wrapper script called nvcc would pass for a toolkit
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    toolkit = nvcc is not None and os.path.exists(nvcc) and os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h"))
    if forced:
        if not toolkit:
            raise SystemExit(
                f"PCDEQ_FORCE_CUDA=1 but no CUDA toolkit at CUDA_HOME={CUDA_HOME!r} (needs bin/nvcc and "
                "include/cuda_runtime.h): set CUDA_HOME to the toolkit root"
            )
        return True
    if torch.version.cuda is None:
        return False  # a CPU build of torch: the CPU extension only
    if not toolkit:
        print(
            f"pcdeq_kernels: torch is a CUDA build but there is no CUDA toolkit at CUDA_HOME={CUDA_HOME!r}; "
            "building the CPU kernels only (set CUDA_HOME to the toolkit root to build the CUDA kernels)"
        )
        return False
    return True


def nvcc_flags():
    # No --use_fast_math: it would turn tanhf/expf into approximations (and flush denormals), and the
    # accuracy tests hold the CUDA backend to the same activation accuracy as the others; the
    # epilogue's math is a small part of a step anyway.
    flags = ["-O3", "-lineinfo"]
    if os.environ.get("PCDEQ_PTXAS_VERBOSE") == "1":
        flags += ["-Xptxas", "-v"]
    return flags


def extension_modules():
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/ops.cpp"))
    if os.environ.get("PCDEQ_NO_EXT") == "1" or not sources:
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("pcdeq_kernels: no C++ compiler found, building the pure-Python package only")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("pcdeq_kernels: torch is not importable at build time (use --no-build-isolation); pure-Python build")
        return [], {}
    # -Wno-*: as in torch's own build, whose headers trip these (unroll pragmas for nvcc, GCC 12
    # false positives inside the AVX-512 intrinsics)
    cxx_flags = ["-O3", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"] + simd_flags()
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if cuda_build_wanted(cuda_sources):
        from torch.utils.cpp_extension import CUDAExtension

        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        print(f"pcdeq_kernels: building the CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r}")
        ext = CUDAExtension(
            "pcdeq_kernels._C",
            sources + cuda_sources,
            include_dirs=[os.path.abspath("csrc/include"), os.path.abspath("csrc")],
            # the SIMD flags are host-compiler flags for the .cpp files only
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags()},
            extra_link_args=["-fopenmp"],
        )
        return [ext], {"build_ext": BuildExtension}
    ext = CppExtension(
        "pcdeq_kernels._C",
        sources,
        include_dirs=[os.path.abspath("csrc/include")],
        extra_compile_args=cxx_flags,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


def version():
    """The package version from pcdeq_kernels/__init__.py, plus PCDEQ_LOCAL_VERSION as a PEP 440 local
    label naming the torch (and CUDA) a wheel was compiled against, e.g. 0.1.0+cu130.torch2.14."""
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pcdeq_kernels", "__init__.py")).read()
    base = re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)
    local = os.environ.get("PCDEQ_LOCAL_VERSION")
    return f"{base}+{local}" if local else base


def requirements(compiled: bool) -> list[str]:
    """torch and numpy. A build with the compiled extension loads only with the torch minor version it
    was compiled against (the regular libtorch C++ ABI), so its metadata pins that minor version: pip
    then refuses to install a wheel beside another torch, or to upgrade torch under it, instead of
    leaving an extension that fails to load."""
    if not compiled:
        return ["torch>=2.4", "numpy"]
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return [f"torch=={major}.{minor}.*", "numpy"]


ext_modules, cmdclass = extension_modules()
setup(version=version(), ext_modules=ext_modules, cmdclass=cmdclass, install_requires=requirements(bool(ext_modules)))
