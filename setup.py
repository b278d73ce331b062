"""The optional native kernels (service/core/_native.c); everything else is in pyproject.toml.

``optional=True``: where the extension cannot be compiled (no C compiler), setuptools warns
and installs optserve without it, and core runs the same steps in numpy, to the same bits
(service/core/native.py).
"""

from setuptools import Extension, setup

# -ffp-contract=off: no multiply and add fused into one rounding (the bits must be numpy's);
# -fno-math-errno: sqrtf may be a vector instruction (no errno to set for a negative input).
setup(
    ext_modules=[
        Extension(
            "service.core._native",
            ["service/core/_native.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
            optional=True,
        )
    ]
)
