"""Build of the optional C kernels (everything else is in pyproject.toml).

``atlasmap/nn/_nbkernel.c`` (likelihood) and ``_stack.c`` (query-training step) are plain C loaded with
ctypes (see ``atlasmap/nn/kernel.py``), built into one library. The extension is optional: without a
working C compiler the install goes on and atlasmap uses its PyTorch likelihood and autograd.
"""

import sys

from setuptools import Extension, setup

# -fno-math-errno lets the compiler call glibc's vector math (libmvec); no -ffast-math, so NaN and inf
# keep their IEEE meaning. On Linux -fopenmp: the library then needs libgomp.so.1, which resolves to the
# copy PyTorch's Linux wheels load first, so the kernel runs on PyTorch's own OpenMP threads. Elsewhere
# only the `omp simd` pragmas are honoured (-fopenmp-simd) and the kernel runs on one thread.
openmp = ["-fopenmp"] if sys.platform.startswith("linux") else ["-fopenmp-simd"]
flags = [] if sys.platform == "win32" else ["-O3", "-fno-math-errno", "-fno-trapping-math", *openmp]

setup(
    ext_modules=[
        Extension(
            "atlasmap.nn._nbkernel",
            sources=["src/atlasmap/nn/_nbkernel.c", "src/atlasmap/nn/_stack.c"],
            extra_compile_args=flags,
            extra_link_args=openmp if sys.platform.startswith("linux") else [],
            libraries=[] if sys.platform == "win32" else ["m"],
            optional=True,
        )
    ]
)
