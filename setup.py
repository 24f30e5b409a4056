"""Build of the optional C likelihood kernel (everything else is in pyproject.toml).

``atlasmap/nn/_nbkernel.c`` is plain C loaded with ctypes (see ``atlasmap/nn/kernel.py``). The extension is
optional: without a working C compiler the install goes on and atlasmap uses its PyTorch likelihood.
"""

import sys

from setuptools import Extension, setup

# -fno-math-errno lets the compiler call glibc's vector math (libmvec); no -ffast-math, so NaN and inf
# keep their IEEE meaning. -fopenmp-simd only honours the `omp simd` pragmas: no OpenMP runtime is linked.
flags = [] if sys.platform == "win32" else ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]

setup(
    ext_modules=[
        Extension(
            "atlasmap.nn._nbkernel",
            sources=["src/atlasmap/nn/_nbkernel.c"],
            extra_compile_args=flags,
            libraries=[] if sys.platform == "win32" else ["m"],
            optional=True,
        )
    ]
)
