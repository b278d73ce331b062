from tests.core.cases import optimizer_cases

VARIANTS: dict[str, dict[str, object]] = {
    "adam-amsgrad-decay": {
        "name": "Adam",
        "lr": 0.01,
        "betas": [0.8, 0.99],
        "eps": 1e-6,
        "weight_decay": 0.1,
        "amsgrad": True,
    },
    "adam-maximize-decay": {"name": "Adam", "lr": 0.01, "weight_decay": 0.05, "maximize": True},
    "adam-maximize": {"name": "Adam", "lr": 0.02, "betas": [0.5, 0.9], "maximize": True},
    "adam-decoupled-amsgrad-maximize": {
        "name": "Adam",
        "lr": 0.01,
        "weight_decay": 0.1,
        "decoupled_weight_decay": True,
        "amsgrad": True,
        "maximize": True,
    },
    "adamw-defaults": {"name": "AdamW"},
    "adamw-amsgrad-maximize": {
        "name": "AdamW",
        "lr": 0.02,
        "betas": [0.85, 0.995],
        "eps": 1e-7,
        "weight_decay": 0.3,
        "amsgrad": True,
        "maximize": True,
    },
}

CASES = optimizer_cases(VARIANTS)
