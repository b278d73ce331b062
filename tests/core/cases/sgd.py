from tests.core.cases import DEFAULT_PARAMS, Case

CASES = [
    Case(
        id=f"sgd-{variant}-{dtype}",
        config={
            "optimizer": {"name": "SGD", "lr": 0.05, **hp},
            "params": DEFAULT_PARAMS,
            "dtype": dtype,
        },
    )
    for dtype in ("float32", "float64")
    for variant, hp in {
        "plain": {},
        "momentum": {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
        "nesterov-maximize": {"momentum": 0.8, "nesterov": True, "maximize": True},
    }.items()
]
