from tests.core.cases import DEFAULT_PARAMS, Case

# One LBFGS.step(closure) per gradient; the ask/tell line-search modes are checked point by
# point against torch's closure calls in tests/core/test_lbfgs.py.
CASES = [
    Case(
        id=f"lbfgs-maxiter1-h{history}-{dtype}",
        config={
            "optimizer": {"name": "LBFGS", "lr": 0.05, "max_iter": 1, "history_size": history},
            "params": DEFAULT_PARAMS,
            "dtype": dtype,
        },
        steps=100,
    )
    for dtype in ("float32", "float64")
    for history in (3, 100)
]
