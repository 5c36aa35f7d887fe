"""Build script: the pure-Python package always; the compiled extension ``pcdeq_kernels._C`` when its
sources exist under ``csrc/`` and a C++ compiler and torch are present.

Environment:
    PCDEQ_NO_EXT=1                 build the pure-Python package only.
    PCDEQ_CPU_CAPABILITY=LEVEL     SIMD level of the C++ CPU kernels: "default" (portable), "avx2" or
                                   "avx512". Unset: the best level torch uses on the build machine, as
                                   with -march=native (set "default" or "avx2" to build for other CPUs).
"""

import glob
import os
import platform
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
    ext = CppExtension(
        "pcdeq_kernels._C",
        sources,
        include_dirs=[os.path.abspath("csrc/include")],
        # -Wno-*: as in torch's own build, whose headers trip these (unroll pragmas for nvcc, GCC 12
        # false positives inside the AVX-512 intrinsics)
        extra_compile_args=["-O3", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"] + simd_flags(),
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
