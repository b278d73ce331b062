from tests.core.cases import optimizer_cases

VARIANTS: dict[str, dict[str, object]] = {
    "adadelta-decay": {
        "name": "Adadelta",
        "lr": 0.5,
        "rho": 0.8,
        "eps": 1e-5,
        "weight_decay": 0.1,
    },
    "adadelta-maximize": {"name": "Adadelta", "lr": 2.0, "rho": 0.95, "maximize": True},
    "adadelta-maximize-decay": {
        "name": "Adadelta",
        "lr": 1.5,
        "weight_decay": 0.05,
        "maximize": True,
    },
}

CASES = optimizer_cases(VARIANTS)
