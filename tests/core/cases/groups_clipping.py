from tests.core.cases import dtype_cases

PARAMS = {"w": {"shape": [6, 4]}, "b": {"shape": [4]}, "emb": {"shape": [3, 2]}}

CLIPPING = {
    "norm2": {"clip_grad_norm": {"max_norm": 1.0}},
    "norm1": {"clip_grad_norm": {"max_norm": 2.0, "norm_type": 1.0}},
    "norm3": {"clip_grad_norm": {"max_norm": 1.5, "norm_type": 3.0}},
    "norminf": {"clip_grad_norm": {"max_norm": 0.5, "norm_type": float("inf")}},
    "value": {"clip_grad_value": {"clip_value": 0.7}},
}

CASES = dtype_cases(
    {
        f"groups-clip-{clip}": {
            "optimizer": {"name": "SGD", "lr": 0.03, "momentum": 0.9, "weight_decay": 1e-3},
            "params": PARAMS,
            "param_groups": [
                {"params": ["b"], "weight_decay": 0.0, "lr": 0.1},
                {"params": ["emb"], "momentum": 0.5, "nesterov": True},
            ],
            **clip_config,
        }
        for clip, clip_config in CLIPPING.items()
    },
    grad_scale=3.0,
)

# torch's Adagrad fills every group's sums from the constructor's initial_accumulator_value;
# a group's override of it is kept in the group and never read.
CASES += dtype_cases(
    {
        "groups-adagrad-accumulator": {
            "optimizer": {"name": "Adagrad", "lr": 0.05, "initial_accumulator_value": 0.1},
            "params": PARAMS,
            "param_groups": [{"params": ["b"], "initial_accumulator_value": 2.0, "lr": 0.02}],
        }
    },
    grad_scale=3.0,
)
