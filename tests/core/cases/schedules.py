"""Parity cases with a learning-rate schedule: optimizer and schedule together, as torch runs them.

The lr (and momentum or beta1) sequences themselves are checked exactly in
tests/core/test_schedules.py; these cases check that the schedule drives the optimizer
the way torch's scheduler drives its param_groups, with groups, ``interval`` and ``every``.
"""

from typing import Any

from tests.core.cases import DEFAULT_PARAMS, Case

NO_DECAY_BIAS = [{"params": ["b"], "weight_decay": 0.0, "lr": 0.01}]

SGD_MOMENTUM = {"name": "SGD", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}

VARIANTS: dict[str, dict[str, Any]] = {
    "sgd-onecycle-momentum": {
        "optimizer": SGD_MOMENTUM,
        "schedule": {"name": "OneCycleLR", "max_lr": 0.1, "total_steps": 200, "pct_start": 0.25},
    },
    "adam-onecycle-three-phase-beta1": {
        "optimizer": {"name": "Adam", "lr": 1e-3, "betas": [0.9, 0.99]},
        "schedule": {
            "name": "OneCycleLR",
            "max_lr": [0.02, 0.05],
            "epochs": 20,
            "steps_per_epoch": 10,
            "three_phase": True,
            "anneal_strategy": "linear",
        },
        "param_groups": NO_DECAY_BIAS,
    },
    "adam-cyclic-beta1": {
        "optimizer": {"name": "Adam", "lr": 1e-3, "weight_decay": 1e-2},
        "schedule": {
            "name": "CyclicLR",
            "base_lr": 1e-4,
            "max_lr": 1e-2,
            "step_size_up": 25,
            "mode": "triangular2",
            "base_momentum": 0.8,
            "max_momentum": 0.95,
        },
    },
    "sgd-cyclic-momentum-groups": {
        "optimizer": {"name": "SGD", "lr": 0.05, "weight_decay": 1e-3},
        "schedule": {
            "name": "CyclicLR",
            "base_lr": [0.01, 0.001],
            "max_lr": [0.1, 0.02],
            "step_size_up": 10,
            "step_size_down": 30,
            "mode": "exp_range",
            "gamma": 0.99,
        },
        "param_groups": NO_DECAY_BIAS,
    },
    "adamw-warmup-cosine": {
        "optimizer": {"name": "AdamW", "lr": 0.01, "weight_decay": 0.05},
        "schedule": {
            "name": "SequentialLR",
            "schedulers": [
                {"name": "LinearLR", "start_factor": 0.1, "total_iters": 20},
                {"name": "CosineAnnealingLR", "T_max": 180, "eta_min": 1e-5},
            ],
            "milestones": [20],
        },
        "param_groups": NO_DECAY_BIAS,
    },
    "adam-chained": {
        "optimizer": {"name": "Adam", "lr": 0.01},
        "schedule": {
            "name": "ChainedScheduler",
            "schedulers": [
                {"name": "ConstantLR", "factor": 0.5, "total_iters": 10},
                {"name": "ExponentialLR", "gamma": 0.99},
            ],
        },
    },
    "sgd-warmrestarts-groups": {
        "optimizer": SGD_MOMENTUM,
        "schedule": {"name": "CosineAnnealingWarmRestarts", "T_0": 15, "T_mult": 2},
        "param_groups": NO_DECAY_BIAS,
    },
    "sgd-steplr-every": {
        "optimizer": SGD_MOMENTUM,
        "schedule": {"name": "StepLR", "step_size": 3, "gamma": 0.7, "every": 10},
    },
    "sgd-plateau-manual": {
        "optimizer": SGD_MOMENTUM,
        "schedule": {
            "name": "ReduceLROnPlateau",
            "factor": 0.5,
            "patience": 1,
            "interval": "manual",
        },
    },
    "adam-plateau-every-step": {
        "optimizer": {"name": "Adam", "lr": 0.01},
        "schedule": {
            "name": "ReduceLROnPlateau",
            "factor": 0.3,
            "patience": 5,
            "cooldown": 3,
            "min_lr": [1e-3, 1e-4],
        },
        "param_groups": NO_DECAY_BIAS,
    },
}

CASES = [
    Case(
        id=f"sched-{variant}-{dtype}",
        config={"params": DEFAULT_PARAMS, "dtype": dtype, **config},
        metrics=config["schedule"]["name"] == "ReduceLROnPlateau",
        # Parameters stay of order one, as in training. With unit gradients they random-walk
        # to |p| ~ 16, where float32's rounding (about 1e-6 there) exceeds atol for an
        # element that comes back near zero, whatever the schedule.
        grad_scale=0.3,
    )
    for dtype in ("float32", "float64")
    for variant, config in VARIANTS.items()
]
