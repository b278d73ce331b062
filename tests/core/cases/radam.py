from tests.core.cases import optimizer_cases

VARIANTS: dict[str, dict[str, object]] = {
    "radam-plain": {"name": "RAdam", "lr": 0.01},
    "radam-coupled-decay-maximize": {
        "name": "RAdam",
        "lr": 0.01,
        "betas": [0.8, 0.99],
        "eps": 1e-6,
        "weight_decay": 0.05,
        "maximize": True,
    },
    # beta2 = 0.9: rho_inf = 19, so the first steps run unrectified, then rectified.
    "radam-decoupled-late-rectification": {
        "name": "RAdam",
        "lr": 0.02,
        "betas": [0.85, 0.9],
        "weight_decay": 0.1,
        "decoupled_weight_decay": True,
    },
    # beta2 = 0.6: rho_inf = 4, never above the threshold of 5: momentum steps only.
    "radam-never-rectified": {"name": "RAdam", "lr": 0.005, "betas": [0.9, 0.6]},
}

CASES = optimizer_cases(VARIANTS)
