"""The training loops people write, RemoteOptimizer against torch.optim side by side.

Each test runs one loop twice on copies of one model (float64, the same batches): once with
a local torch optimizer, once with RemoteOptimizer on a live server, and compares every
parameter to 1e-10. The loops do what torch allows to an optimizer besides ``step()``:
tensors without a gradient, frozen tensors, hand edits of ``param_groups``, client-side
schedulers of any kind, ``add_param_group``, checkpoints taken after such changes.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from optserve_client import Client  # noqa: E402
from optserve_client.torch import RemoteOptimizer  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-10
STEPS = 20


class Net(torch.nn.Module):  # type: ignore[misc]
    """A body and two heads; ``head_b`` is used on some steps only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(5, 8)
        self.head_a = torch.nn.Linear(8, 2)
        self.head_b = torch.nn.Linear(8, 2)

    def forward(self, x: Any, use_b: bool = True) -> Any:
        h = torch.tanh(self.body(x))
        out = self.head_a(h)
        return out + self.head_b(h) if use_b else out


def batches(count: int = STEPS) -> list[tuple[Any, Any]]:
    gen = torch.Generator().manual_seed(7)
    return [
        (torch.randn(16, 5, generator=gen, dtype=torch.float64),
         torch.randn(16, 2, generator=gen, dtype=torch.float64))
        for _ in range(count)
    ]  # fmt: skip


def twins() -> tuple[Any, Any]:
    model = Net().double()
    return model, copy.deepcopy(model)


def train(
    model: Any,
    opt: Any,
    *,
    before_step: Callable[[int], None] = lambda n: None,
    after_step: Callable[[int, float], None] = lambda n, loss: None,
    use_b: Callable[[int], bool] = lambda n: True,
    micro_batches: int = 1,
) -> None:
    for n, (x, y) in enumerate(batches()):
        opt.zero_grad()
        loss = None
        for part in range(micro_batches):
            xs = x[part::micro_batches]
            ys = y[part::micro_batches]
            loss = torch.nn.functional.mse_loss(model(xs, use_b(n)), ys) / micro_batches
            loss.backward()
        before_step(n)
        opt.step()
        assert loss is not None
        after_step(n, float(loss.item()))


def assert_same(a: Any, b: Any) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert float((p - q).detach().abs().max()) <= TOL, name


def remote(model: Any, client: Client, optimizer: dict[str, Any], **kw: Any) -> RemoteOptimizer:
    return RemoteOptimizer(model.named_parameters(), client=client, optimizer=optimizer, **kw)


def test_a_head_without_gradient_on_some_steps_is_skipped(client: Client) -> None:
    local, far = twins()
    every_third = lambda n: n % 3 == 0  # noqa: E731
    opt = torch.optim.Adam(local.parameters(), lr=0.01, weight_decay=0.1)
    train(local, opt, use_b=every_third)
    ropt = remote(far, client, {"name": "Adam", "lr": 0.01, "weight_decay": 0.1})
    train(far, ropt, use_b=every_third)
    assert_same(local, far)


def test_frozen_tensors_passed_to_the_optimizer_stay_put(client: Client) -> None:
    local, far = twins()
    for model in (local, far):
        model.body.requires_grad_(False)
    opt = torch.optim.AdamW(local.parameters(), lr=0.02, weight_decay=0.3)
    train(local, opt)
    ropt = remote(far, client, {"name": "AdamW", "lr": 0.02, "weight_decay": 0.3})
    train(far, ropt)
    assert_same(local, far)
    assert torch.equal(far.body.weight, Net().double().body.weight)


def _edits(opt: Any) -> Callable[[int], None]:
    def edit(n: int) -> None:
        if n == 5:
            opt.param_groups[0]["lr"] = 0.05
        if n == 9:
            opt.param_groups[0]["weight_decay"] = 0.0
            opt.param_groups[0]["momentum"] = 0.5

    return edit


def test_hand_edits_of_lr_and_weight_decay_apply(client: Client) -> None:
    local, far = twins()
    config = {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.01}
    opt = torch.optim.SGD(local.parameters(), **config)
    train(local, opt, before_step=_edits(opt))
    ropt = remote(far, client, {"name": "SGD", **config})
    train(far, ropt, before_step=_edits(ropt))
    assert_same(local, far)
    fields = [(c["step"], c["field"], c["new"]) for c in ropt.session.changes()]
    assert fields == [(5, "lr", 0.05), (9, "momentum", 0.5), (9, "weight_decay", 0.0)]


@pytest.mark.parametrize(
    "scheduler",
    [
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + e)),
        lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda e: 0.9),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=STEPS),
    ],
    ids=["LambdaLR", "MultiplicativeLR", "OneCycleLR"],
)
def test_a_client_side_scheduler_drives_the_remote_optimizer(
    client: Client, scheduler: Callable[[Any], Any]
) -> None:
    local, far = twins()
    opt = torch.optim.SGD(local.parameters(), lr=0.05, momentum=0.9)
    sched = scheduler(opt)
    train(local, opt, after_step=lambda n, loss: sched.step())
    ropt = remote(far, client, {"name": "SGD", "lr": 0.05, "momentum": 0.9})
    rsched = scheduler(ropt)
    train(far, ropt, after_step=lambda n, loss: rsched.step())
    assert_same(local, far)


def test_client_side_reduce_lr_on_plateau_with_a_server_schedule(client: Client) -> None:
    local, far = twins()
    opt = torch.optim.Adam(local.parameters(), lr=0.02)
    server_side = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)

    def local_after(n: int, loss: float) -> None:
        server_side.step()
        plateau.step(loss + n * 1e-3)  # a loss that never improves

    train(local, opt, after_step=local_after)
    ropt = remote(
        far,
        client,
        {"name": "Adam", "lr": 0.02},
        schedule={"name": "StepLR", "step_size": 4, "gamma": 0.7},
    )
    rplateau = torch.optim.lr_scheduler.ReduceLROnPlateau(ropt, factor=0.5, patience=1)
    train(far, ropt, after_step=lambda n, loss: rplateau.step(loss + n * 1e-3))
    assert_same(local, far)
    assert ropt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_a_scheduler_and_a_hand_edit_before_the_same_step(client: Client) -> None:
    local, far = twins()

    def run(model: Any, opt: Any) -> None:
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)

        def after(n: int, loss: float) -> None:
            sched.step()
            if n == 6:
                opt.param_groups[0]["lr"] *= 3  # the last writer before step() wins

        train(model, opt, after_step=after)

    run(local, torch.optim.SGD(local.parameters(), lr=0.05))
    run(far, remote(far, client, {"name": "SGD", "lr": 0.05}))
    assert_same(local, far)


def test_add_param_group_unfreezes_a_layer_mid_run(client: Client) -> None:
    local, far = twins()

    def run(model: Any, opt: Any) -> None:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)

        def before(n: int) -> None:
            if n == 8:
                model.body.requires_grad_(True)
                opt.add_param_group({"params": list(model.body.parameters()), "lr": 0.005})

        train(model, opt, before_step=before, after_step=lambda n, loss: sched.step())

    for model in (local, far):
        model.body.requires_grad_(False)
    heads = lambda m: [*m.head_a.parameters(), *m.head_b.parameters()]  # noqa: E731
    run(local, torch.optim.Adam(heads(local), lr=0.01))
    named = [(n, p) for n, p in far.named_parameters() if not n.startswith("body")]
    run(far, RemoteOptimizer(named, client=client, optimizer={"name": "Adam", "lr": 0.01}))
    assert_same(local, far)


def test_two_groups_with_one_frozen_and_gradient_accumulation(client: Client) -> None:
    local, far = twins()
    for model in (local, far):
        model.head_b.requires_grad_(False)

    def groups(model: Any) -> list[dict[str, Any]]:
        return [
            {"params": list(model.body.parameters()) + list(model.head_a.parameters())},
            {"params": list(model.head_b.parameters()), "lr": 0.1},
        ]

    train(local, torch.optim.RMSprop(groups(local), lr=0.01, momentum=0.5), micro_batches=4)
    ropt = RemoteOptimizer(groups(far), client=client, optimizer={"name": "RMSprop", "lr": 0.01,
                                                               "momentum": 0.5})  # fmt: skip
    train(far, ropt, micro_batches=4)
    assert_same(local, far)


def test_a_checkpoint_after_edits_and_an_added_group_resumes_exactly(client: Client) -> None:
    local, far = twins()
    far.body.requires_grad_(False)
    named = [(n, p) for n, p in far.named_parameters() if not n.startswith("body")]
    ropt = RemoteOptimizer(named, client=client, optimizer={"name": "AdamW", "lr": 0.01})
    local.body.requires_grad_(False)
    heads = [*local.head_a.parameters(), *local.head_b.parameters()]
    opt = torch.optim.AdamW(heads, lr=0.01)

    def changes(model: Any, o: Any) -> Callable[[int], None]:
        def before(n: int) -> None:
            if n == 3:
                o.param_groups[0]["betas"] = (0.8, 0.99)
            if n == 5:
                model.body.requires_grad_(True)
                group: dict[str, Any] = {"params": list(model.body.parameters())}
                if isinstance(o, RemoteOptimizer):
                    group["param_names"] = ["body.weight", "body.bias"]
                o.add_param_group(group)

        return before

    train(local, opt, before_step=changes(local, opt))
    train(far, ropt, before_step=changes(far, ropt))
    buffer = io.BytesIO()
    torch.save(ropt.state_dict(), buffer)
    resumed_model = copy.deepcopy(far)
    names = ["head_a.weight", "head_a.bias", "head_b.weight", "head_b.bias"]
    tensors = dict(resumed_model.named_parameters())
    resumed = RemoteOptimizer(
        [
            {"params": [tensors[n] for n in names], "param_names": names},
            {
                "params": list(resumed_model.body.parameters()),
                "param_names": ["body.weight", "body.bias"],
            },
        ],
        client=client,
        optimizer={"name": "AdamW", "lr": 0.01},
    )
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert resumed.param_groups[0]["betas"] == [0.8, 0.99]
    train(local, opt)
    train(resumed_model, resumed)
    assert_same(local, resumed_model)


def test_per_tensor_step_counts_move_to_torch_and_back(client: Client) -> None:
    """A head skipped on some steps has its own Adam step count, on either side."""
    local, far = twins()
    every_third = lambda n: n % 3 == 0  # noqa: E731
    opt = torch.optim.Adam(local.parameters(), lr=0.01)
    train(local, opt, use_b=every_third)
    ropt = remote(far, client, {"name": "Adam", "lr": 0.01})
    train(far, ropt, use_b=every_third)
    steps = {int(s["step"]) for s in opt.state.values()}
    assert len(steps) == 2  # the skipped head is behind

    moved = copy.deepcopy(local)
    moved_opt = torch.optim.Adam(moved.parameters(), lr=0.01)
    moved_opt.load_state_dict(opt.state_dict())
    up = RemoteOptimizer.from_torch(moved_opt, client=client)
    back, _ = ropt.to_torch()
    for state, ours in zip(opt.state.values(), back.state.values(), strict=True):
        assert int(state["step"]) == int(ours["step"])
    train(local, opt, use_b=every_third)
    train(moved, up, use_b=every_third)
    train(far, back, use_b=every_third)
    assert_same(local, moved)
    assert_same(local, far)


def test_grad_scaler_skips_overflowing_steps_as_with_torch(client: Client) -> None:
    """GradScaler unscales the grads in place and calls step() only when they are finite."""
    local, far = twins()

    def run(model: Any, opt: Any) -> list[float]:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        scales = []
        for n, (x, y) in enumerate(batches()):
            if n in (3, 4):
                x = x.clone()
                x[0, 0] = float("inf")  # non-finite gradients: GradScaler skips step()
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(float(scaler.get_scale()))
        return scales

    expected = run(local, torch.optim.Adam(local.parameters(), lr=0.01))
    got = run(far, remote(far, client, {"name": "Adam", "lr": 0.01}))
    assert got == expected and min(expected) < 2.0**16  # steps were skipped
    assert_same(local, far)
