from tests.core.cases import optimizer_cases

VARIANTS: dict[str, dict[str, object]] = {
    "nadam-plain": {"name": "NAdam", "lr": 0.01},
    "nadam-coupled-decay-maximize": {
        "name": "NAdam",
        "lr": 0.01,
        "betas": [0.8, 0.99],
        "eps": 1e-6,
        "weight_decay": 0.05,
        "momentum_decay": 0.01,
        "maximize": True,
    },
    "nadam-decoupled-decay": {
        "name": "NAdam",
        "lr": 0.01,
        "betas": [0.85, 0.995],
        "weight_decay": 0.1,
        "momentum_decay": 0.002,
        "decoupled_weight_decay": True,
    },
}

CASES = optimizer_cases(VARIANTS)
