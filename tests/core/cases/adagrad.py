from tests.core.cases import optimizer_cases

VARIANTS: dict[str, dict[str, object]] = {
    "adagrad-decay-accumulator": {
        "name": "Adagrad",
        "lr": 0.05,
        "lr_decay": 0.01,
        "weight_decay": 0.1,
        "initial_accumulator_value": 0.5,
        "eps": 1e-6,
    },
    "adagrad-maximize": {"name": "Adagrad", "lr": 0.05, "lr_decay": 0.02, "maximize": True},
    "adagrad-maximize-decay": {
        "name": "Adagrad",
        "lr": 0.03,
        "weight_decay": 0.05,
        "maximize": True,
    },
}

CASES = optimizer_cases(VARIANTS)
