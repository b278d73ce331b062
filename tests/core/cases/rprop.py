from tests.core.cases import DEFAULT_PARAMS, Case

VARIANTS: dict[str, dict[str, object]] = {
    "rprop-plain": {"name": "Rprop", "lr": 0.03},
    "rprop-bounded-maximize": {
        "name": "Rprop",
        "lr": 0.03,
        "etas": [0.3, 1.5],
        "step_sizes": [1e-3, 0.2],
        "maximize": True,
    },
}

# The step sizes start from the lr the first step sees, after the schedule scaled it.
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
        id=f"rprop-warmup-{dtype}",
        config={
            "optimizer": VARIANTS["rprop-bounded-maximize"],
            "schedule": WARMUP,
            "params": DEFAULT_PARAMS,
            "dtype": dtype,
        },
    )
    for dtype in ("float32", "float64")
]
