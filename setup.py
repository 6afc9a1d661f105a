"""The optional C kernel (``actfmt._kernel``); everything else is in pyproject.toml.

``optional=True``: without a C compiler the build goes on and actfmt uses its numpy kernel (same figures, slower).
Baseline x86-64 flags only, so the wheel runs on any x86-64; the AVX-512 or AVX2 version is chosen at run time.
``ACTFMT_PURE=1`` builds without it: a pure-Python ``py3-none-any`` wheel (the numpy kernel), for any platform.
"""

import os

from setuptools import Extension, setup

KERNEL = Extension(
    "actfmt._kernel",
    sources=["src/actfmt/_kernel.c"],
    extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math"],
    optional=True,
)

setup(ext_modules=[] if os.environ.get("ACTFMT_PURE") == "1" else [KERNEL])
