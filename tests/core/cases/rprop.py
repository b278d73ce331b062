from tests.core.cases import optimizer_cases, warmup_cases

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
CASES = optimizer_cases(VARIANTS) + warmup_cases("rprop", VARIANTS["rprop-bounded-maximize"])
