from tests.core.cases import optimizer_cases

VARIANTS = {
    "plain": {},
    "momentum": {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
    "nesterov-maximize": {"momentum": 0.8, "nesterov": True, "maximize": True},
}

CASES = optimizer_cases(
    {f"sgd-{variant}": {"name": "SGD", "lr": 0.05, **hp} for variant, hp in VARIANTS.items()}
)
