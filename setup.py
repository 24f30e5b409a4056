"""Build of the optional compiled kernels (everything else is in pyproject.toml).

``atlasmap/ops/_native.c`` is a CPython extension module (Python C API only: no numpy or torch headers, so
the build needs nothing but a C compiler and Python's headers) that checks its arguments and calls the
kernels in ``atlasmap/ops/kernels/`` (``nbkernel.c``: likelihood, CSR gather, count checks; ``stack.c``:
the training step's layers, dropout uniforms, Adam). The extension is optional: without a working C
compiler the install goes on and :mod:`atlasmap.ops` runs its pure-PyTorch reference implementations.
"""

import sys

from setuptools import Extension, setup

# -fno-math-errno lets the compiler call glibc's vector math (libmvec); no -ffast-math, so NaN and inf
# keep their IEEE meaning. On Linux -fopenmp: the module then needs libgomp.so.1, which resolves to the
# copy PyTorch's Linux wheels load first, so the kernels run on PyTorch's own OpenMP threads. Elsewhere
# only the `omp simd` pragmas are honoured (-fopenmp-simd) and the kernels run on one thread.
openmp = ["-fopenmp"] if sys.platform.startswith("linux") else ["-fopenmp-simd"]
flags = [] if sys.platform == "win32" else ["-O3", "-fno-math-errno", "-fno-trapping-math", *openmp]

setup(
    ext_modules=[
        Extension(
            "atlasmap.ops._native",
            sources=["src/atlasmap/ops/_native.c", "src/atlasmap/ops/kernels/nbkernel.c",
                     "src/atlasmap/ops/kernels/stack.c"],
            depends=["src/atlasmap/ops/kernels/kernels.h"],
            extra_compile_args=flags,
            extra_link_args=openmp if sys.platform.startswith("linux") else [],
            libraries=[] if sys.platform == "win32" else ["m"],
            optional=True,
        )
    ]
)
