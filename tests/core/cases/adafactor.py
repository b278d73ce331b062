from dataclasses import replace

from tests.core.cases import optimizer_cases

# A matrix and a 3-D tensor (row and column factors of the last two dims) and a vector.
PARAMS = {"w": {"shape": [7, 5]}, "b": {"shape": [5]}, "conv": {"shape": [3, 4, 6]}}

VARIANTS: dict[str, dict[str, object]] = {
    "adafactor-defaults": {"name": "Adafactor"},
    "adafactor-tuned-decay-maximize": {
        "name": "Adafactor",
        "lr": 0.05,
        "beta2_decay": -0.6,
        "eps": [1e-20, 1e-2],
        "d": 1.5,
        "weight_decay": 0.1,
        "maximize": True,
    },
    "adafactor-clipped-small-grads": {
        "name": "Adafactor",
        "lr": 0.2,
        "beta2_decay": -0.9,
        "eps": [None, 1e-4],
        "d": 1.0,
        "weight_decay": 0.01,
    },
}

CASES = [
    replace(case, grad_scale=0.01) if "small-grads" in case.id else case
    for case in optimizer_cases(VARIANTS, PARAMS)
]
