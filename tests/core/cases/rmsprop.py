from tests.core.cases import optimizer_cases

VARIANTS: dict[str, dict[str, object]] = {
    "rmsprop-alpha-eps": {"name": "RMSprop", "lr": 0.005, "alpha": 0.9, "eps": 1e-6},
    "rmsprop-centered-momentum-decay": {
        "name": "RMSprop",
        "lr": 0.005,
        "alpha": 0.95,
        "weight_decay": 0.1,
        "momentum": 0.8,
        "centered": True,
    },
    "rmsprop-momentum-maximize": {
        "name": "RMSprop",
        "lr": 0.003,
        "momentum": 0.5,
        "maximize": True,
    },
    "rmsprop-centered-maximize-decay": {
        "name": "RMSprop",
        "lr": 0.004,
        "centered": True,
        "maximize": True,
        "weight_decay": 0.02,
    },
}

CASES = optimizer_cases(VARIANTS)
