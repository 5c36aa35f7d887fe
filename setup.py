"""Build script: the pure-Python package always; the compiled extension ``pcdeq_kernels._C`` when its
sources exist under ``csrc/`` and a C++ compiler and torch are present.

Environment:
    PCDEQ_NO_EXT=1   build the pure-Python package only.
"""

import glob
import os
import shutil

from setuptools import setup


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
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
