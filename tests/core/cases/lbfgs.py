from tests.core.cases import optimizer_cases

# One LBFGS.step(closure) per gradient; the ask/tell line-search modes are checked point by
# point against torch's closure calls in tests/core/test_lbfgs.py.
CASES = optimizer_cases(
    {
        f"lbfgs-maxiter1-h{history}": {
            "name": "LBFGS",
            "lr": 0.05,
            "max_iter": 1,
            "history_size": history,
        }
        for history in (3, 100)
    },
    steps=100,
)
