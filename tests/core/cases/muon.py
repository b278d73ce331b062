from tests.core.cases import optimizer_cases

# Muon takes 2-D parameters only: a wide, a tall and a square matrix, small enough that
# torch multiplies them with its reference bfloat16 GEMM (see service/core/bfloat16.py).
PARAMS = {"wide": {"shape": [4, 6]}, "tall": {"shape": [7, 5]}, "square": {"shape": [6, 6]}}

VARIANTS: dict[str, dict[str, object]] = {
    "muon-nesterov": {"name": "Muon", "lr": 0.02},
    "muon-plain-momentum-adamw-rms": {
        "name": "Muon",
        "lr": 0.02,
        "weight_decay": 0.05,
        "momentum": 0.9,
        "nesterov": False,
        "ns_coefficients": [3.0, -4.0, 1.8],
        "eps": 1e-6,
        "ns_steps": 4,
        "adjust_lr_fn": "match_rms_adamw",
    },
    "muon-no-decay": {"name": "Muon", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.8},
}

CASES = optimizer_cases(VARIANTS, PARAMS)
