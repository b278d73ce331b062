"""Partial steps (``missing_grads: "skip"``): tensors without a gradient on some steps.

Every optimizer in two groups with clipping; a seeded pattern leaves each tensor out of
about a third of the steps (``make_inputs``), which torch sees as ``p.grad is None``.
"""

from tests.core.cases import dtype_cases

PARAMS = {"w": {"shape": [6, 4]}, "b": {"shape": [4]}, "head": {"shape": [3, 2]}}
MATRICES = {"w": {"shape": [6, 4]}, "v": {"shape": [4, 4]}, "head": {"shape": [3, 2]}}

OPTIMIZERS: dict[str, dict[str, object]] = {
    "sgd": {"name": "SGD", "lr": 0.03, "momentum": 0.9, "weight_decay": 1e-2, "nesterov": True},
    "adam": {"name": "Adam", "lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
    "adamw": {"name": "AdamW", "lr": 0.01, "weight_decay": 0.2},
    "adagrad": {"name": "Adagrad", "lr": 0.05, "lr_decay": 0.01, "weight_decay": 0.01},
    "rmsprop": {"name": "RMSprop", "lr": 0.01, "momentum": 0.5, "centered": True},
    "adadelta": {"name": "Adadelta", "lr": 0.5, "weight_decay": 0.01},
    "adamax": {"name": "Adamax", "lr": 0.01, "weight_decay": 0.01},
    "asgd": {"name": "ASGD", "lr": 0.01, "t0": 5.0, "weight_decay": 0.01},
    "nadam": {"name": "NAdam", "lr": 0.01, "weight_decay": 0.01},
    "radam": {"name": "RAdam", "lr": 0.01, "weight_decay": 0.01},
    "rprop": {"name": "Rprop", "lr": 0.01},
    "adafactor": {"name": "Adafactor", "lr": 0.01, "weight_decay": 0.01},
    "lbfgs": {"name": "LBFGS", "lr": 0.1, "max_iter": 1, "history_size": 5},
}

CASES = dtype_cases(
    {
        f"partial-{name}": {
            "optimizer": optimizer,
            "params": PARAMS,
            "missing_grads": "skip",
            "clip_grad_norm": {"max_norm": 2.0},
            # LBFGS takes no groups (torch refuses them).
            **({} if name == "lbfgs" else {"param_groups": [{"params": ["head"], "lr": 0.02}]}),
        }
        for name, optimizer in OPTIMIZERS.items()
    }
    | {
        "partial-muon": {
            "optimizer": {"name": "Muon", "lr": 0.02, "weight_decay": 0.05},
            "params": MATRICES,
            "missing_grads": "skip",
            "param_groups": [{"params": ["head"], "lr": 0.01}],
        },
        "partial-sgd-schedule": {
            "optimizer": {"name": "SGD", "lr": 0.1, "momentum": 0.9},
            "schedule": {"name": "StepLR", "step_size": 7, "gamma": 0.5},
            "params": PARAMS,
            "missing_grads": "skip",
        },
    },
    steps=60,
    grad_scale=2.0,
)
