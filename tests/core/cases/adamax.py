from tests.core.cases import optimizer_cases

VARIANTS: dict[str, dict[str, object]] = {
    "adamax-decay": {
        "name": "Adamax",
        "lr": 0.01,
        "betas": [0.8, 0.99],
        "eps": 1e-6,
        "weight_decay": 0.1,
    },
    "adamax-maximize": {"name": "Adamax", "lr": 0.005, "betas": [0.7, 0.9], "maximize": True},
    "adamax-maximize-decay": {
        "name": "Adamax",
        "lr": 0.004,
        "weight_decay": 0.02,
        "maximize": True,
    },
}

CASES = optimizer_cases(VARIANTS)
