from tests.core.cases import DEFAULT_PARAMS, Case

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
WARMUP = {"name": "LinearLR", "start_factor": 0.25, "total_iters": 40}

CASES = [
    Case(
        id=f"{variant}-{dtype}",
        config={"optimizer": optimizer, "params": DEFAULT_PARAMS, "dtype": dtype},
    )
    for dtype in ("float32", "float64")
    for variant, optimizer in VARIANTS.items()
] + [
    Case(
        id=f"asgd-warmup-{dtype}",
        config={
            "optimizer": VARIANTS["asgd-averaging-decay"],
            "schedule": WARMUP,
            "params": DEFAULT_PARAMS,
            "dtype": dtype,
        },
    )
    for dtype in ("float32", "float64")
]
