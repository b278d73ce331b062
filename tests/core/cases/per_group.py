"""An optimizer per param group: Muon on the 2-D weights, AdamW (or SGD) on the rest.

torch's reference is one optimizer per group family, stepped together, each with its own
scheduler built from the session's schedule config (tests/core/torch_reference.py).
"""

from typing import Any

from tests.core.cases import Case, dtype_cases

PARAMS = {
    "w1": {"shape": [4, 6]},
    "w2": {"shape": [6, 6]},
    "b1": {"shape": [6]},
    "b2": {"shape": [6]},
    "scale": {"shape": [3]},
}

MUON = {"name": "Muon", "lr": 0.02, "momentum": 0.9, "weight_decay": 0.05, "ns_steps": 4}
ADAMW = {"name": "AdamW", "lr": 3e-3, "betas": [0.85, 0.98], "weight_decay": 0.02, "eps": 1e-7}

MUON_ADAMW: dict[str, Any] = {
    "optimizer": ADAMW,
    "params": PARAMS,
    "param_groups": [
        # Muon's own constructor arguments, then a group override on top of them.
        {"params": ["w1", "w2"], "optimizer": MUON, "nesterov": False},
        # No optimizer of its own: AdamW's group, with its own lr.
        {"params": ["scale"], "lr": 1e-2, "weight_decay": 0.0},
    ],
}

SCHEDULES: dict[str, dict[str, Any] | None] = {
    "none": None,
    "steplr": {"name": "StepLR", "step_size": 30, "gamma": 0.5},
    "cosine": {"name": "CosineAnnealingLR", "T_max": 80, "eta_min": 1e-4},
    # cycles Muon's momentum and AdamW's beta1, each as its own torch scheduler does
    "onecycle": {"name": "OneCycleLR", "max_lr": 0.03, "total_steps": 200, "pct_start": 0.25},
    "cyclic": {"name": "CyclicLR", "base_lr": 1e-3, "max_lr": 1e-2, "step_size_up": 25},
    "plateau": {"name": "ReduceLROnPlateau", "factor": 0.5, "patience": 3, "cooldown": 2},
    "warm-restarts": {"name": "CosineAnnealingWarmRestarts", "T_0": 20, "T_mult": 2},
    "sequential": {
        "name": "SequentialLR",
        "milestones": [30],
        "schedulers": [
            {"name": "LinearLR", "start_factor": 0.1, "total_iters": 30},
            {"name": "ExponentialLR", "gamma": 0.99},
        ],
    },
}


def _config(schedule: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    return {**MUON_ADAMW, **({"schedule": schedule} if schedule else {}), **extra}


CASES: list[Case] = []
for name, schedule in SCHEDULES.items():
    CASES += dtype_cases(
        {f"per-group-muon-adamw-{name}": _config(schedule)},
        metrics=name == "plateau",
        grad_scale=2.0,
    )

CASES += dtype_cases(
    {
        "per-group-muon-adamw-clip-norm": _config(
            SCHEDULES["cosine"], clip_grad_norm={"max_norm": 1.0}
        ),
        # Steps that leave tensors out: each optimizer skips them, as torch skips a None grad.
        "per-group-muon-adamw-partial": _config(SCHEDULES["steplr"], missing_grads="skip"),
        # The session's optimizer is SGD; the weights name Muon, one group names Adam.
        "per-group-sgd-muon-adam": {
            "optimizer": {"name": "SGD", "lr": 0.05, "momentum": 0.9, "nesterov": True},
            "params": PARAMS,
            "param_groups": [
                {"params": ["w1"], "optimizer": {**MUON, "adjust_lr_fn": "match_rms_adamw"}},
                {"params": ["w2"], "optimizer": MUON, "lr": 0.01},
                {"params": ["b2"], "optimizer": {"name": "Adam", "lr": 1e-2, "amsgrad": True}},
            ],
            "schedule": SCHEDULES["steplr"],
        },
    },
    grad_scale=3.0,
)
