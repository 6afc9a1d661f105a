"""The optional C kernel (actfmt._kernel); everything else is in pyproject.toml.

``optional=True``: without a compiler the build goes on and actfmt uses its numpy kernel (same figures, slower).
Baseline x86-64 flags only (a wheel runs on any x86-64); the AVX2 version is chosen at run time.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "actfmt._kernel",
            sources=["src/actfmt/_kernel.c"],
            extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math"],
            optional=True,
        )
    ]
)
