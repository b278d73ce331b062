from tests.core.cases import optimizer_cases, warmup_cases

VARIANTS: dict[str, dict[str, object]] = {
    "asgd-plain": {"name": "ASGD", "lr": 0.05},
    "asgd-averaging-decay": {
        "name": "ASGD",
        "lr": 0.05,
        "lambd": 0.01,
        "alpha": 0.6,
        "t0": 50.0,
        "weight_decay": 0.02,
    },
    "asgd-maximize-average-from-start": {
        "name": "ASGD",
        "lr": 0.03,
        "lambd": 0.001,
        "alpha": 0.9,
        "t0": 0.0,
        "maximize": True,
    },
}

# eta starts from the lr the first step sees, after the schedule's constructor scaled it.
CASES = optimizer_cases(VARIANTS) + warmup_cases("asgd", VARIANTS["asgd-averaging-decay"])
