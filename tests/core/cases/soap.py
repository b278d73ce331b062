"""SOAP against pytorch_optimizer: 200 steps, float32 and float64, every argument.

SOAP's first bases are the eigenvectors of one gradient's outer products. Along a
dimension longer than the product of the others (a non-square matrix's longer side) that
statistic is singular, and any basis of its null space is an eigenbasis: torch's LAPACK
(MKL) and numpy's (OpenBLAS) pick different ones, and the runs part from the second step
on. So the parity cases use shapes whose every statistic has full rank (square matrices,
a 3-D tensor whose dimensions each fit in the product of the others, vectors left
unpreconditioned); ``NONSQUARE`` shows the difference on other shapes, under the
tolerance measured for it (docs/torch-compatibility.md).
"""

import dataclasses

from tests.core.cases import dtype_cases, optimizer_cases

PARAMS = {"w": {"shape": [5, 5]}, "conv": {"shape": [3, 4, 5]}, "b": {"shape": [5]}}
MERGED = {"kernel": {"shape": [2, 3, 4, 4]}, "w": {"shape": [5, 5]}, "b": {"shape": [7]}}
"""With ``max_precondition_dim=6`` the kernel merges to [6, 4, 4]; the vector is longer
than 6, so it is neither merged to one dimension (which the package fails on) nor
preconditioned."""
SCHEDULE = {"name": "LinearLR", "start_factor": 0.25, "total_iters": 40}

VARIANTS: dict[str, dict[str, object]] = {
    "soap": {"name": "SOAP"},
    "soap-args": {
        "name": "SOAP",
        "lr": 0.01,
        "betas": [0.9, 0.99],
        "shampoo_beta": 0.9,
        "weight_decay": 0.0,
        "precondition_frequency": 5,
        "max_precondition_dim": 4,
        "correct_bias": False,
        "normalize_gradient": True,
        "eps": 1e-7,
        "maximize": True,
    },
}
MERGE_VARIANTS: dict[str, dict[str, object]] = {
    "soap-merge": {"name": "SOAP", "merge_dims": True, "max_precondition_dim": 6},
}

TOLERANCE = {"float32": {"rtol": 1e-4, "atol": 5e-6}, "float64": {"rtol": 1e-5, "atol": 5e-7}}
"""Measured (docs/torch-compatibility.md): the package computes its QR refresh in float32
(torch's LAPACK in single precision) even for float64 tensors, and numpy's LAPACK always
computes in float64; both dtypes then carry float32-level differences in the bases."""

CASES = optimizer_cases(VARIANTS, PARAMS)
CASES += optimizer_cases(MERGE_VARIANTS, MERGED)
CASES += optimizer_cases(
    {"soap-merge-channels-last": {**MERGE_VARIANTS["soap-merge"], "data_format": "channels_last"}},
    {**MERGED, "kernel": {"shape": [2, 4, 4, 3]}},
)
CASES += dtype_cases(
    {
        "soap-args-schedule": {
            "optimizer": VARIANTS["soap-args"],
            "schedule": SCHEDULE,
            "params": PARAMS,
        }
    }
)
CASES += dtype_cases(
    {
        "soap-groups-clip": {
            "optimizer": {"name": "SOAP", "lr": 0.01, "precondition_frequency": 4},
            "params": PARAMS,
            "param_groups": [{"params": ["conv"], "lr": 0.02, "shampoo_beta": 0.8}],
            "clip_grad_norm": {"max_norm": 1.0},
        },
        "soap-partial": {
            "optimizer": {"name": "SOAP", "lr": 0.01, "precondition_frequency": 3},
            "params": PARAMS,
            "missing_grads": "skip",
            "clip_grad_norm": {"max_norm": 2.0},
            "param_groups": [{"params": ["conv"], "lr": 0.02, "weight_decay": 0.0}],
        },
    },
    grad_scale=3.0,
)
NONSQUARE = optimizer_cases(
    {"soap-nonsquare": {"name": "SOAP", "precondition_1d": True}},
    {"w": {"shape": [7, 5]}, "b": {"shape": [5]}},
)
CASES = [dataclasses.replace(c, tolerance=TOLERANCE) for c in CASES]
NONSQUARE_TOLERANCE = {d: {"rtol": 0.0, "atol": 1e-2} for d in ("float32", "float64")}
"""A different null-space basis at the first step: 3.3e-3 measured over 200 steps."""
CASES += [dataclasses.replace(c, tolerance=NONSQUARE_TOLERANCE) for c in NONSQUARE]
