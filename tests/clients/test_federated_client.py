"""The Python federated client against a live server: rounds with long polls, retries that
count once, async mode; and the FedProx helpers against torch's autograd."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
import pytest
from optserve_client import Client, IdempotencyKeyReused
from optserve_client.federated import FederatedClient, Round, proximal_gradient, proximal_term

START = {"w": np.arange(6, dtype=np.float32).reshape(3, 2) / 10, "b": np.zeros(2, np.float32)}


def trainer(seed: int, n: int = 10) -> tuple[object, list[dict[str, np.ndarray]]]:
    sent: list[dict[str, np.ndarray]] = []

    def train(current: Round) -> tuple[Mapping[str, np.ndarray], int]:
        rng = np.random.default_rng([seed, current.number or 0])
        new = {
            k: (v + rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in current.params.items()
        }
        sent.append(new)
        return new, n

    return train, sent


def test_clients_run_rounds_and_the_server_averages(client: Client) -> None:
    session = client.create_session(
        {"name": "FedAvg"},
        START,
        aggregation={"mode": "rounds", "clients_per_round": 2, "proximal_mu": 0.01},
    )
    try:
        members = [FederatedClient(client, session.id, f"c{i}") for i in range(2)]
        trainers = [trainer(i, n=10 * (i + 1)) for i in range(2)]
        replies: list[list[dict[str, object]]] = [[], []]

        def take_part(i: int) -> None:
            replies[i] = members[i].run(trainers[i][0], rounds=3, timeout=30)  # type: ignore[arg-type]

        threads = [threading.Thread(target=take_part, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(len(r) == 3 for r in replies)
        current = members[0].fetch()
        assert current is not None and current.number == 4 and current.proximal_mu == 0.01
        # After round 3 the params are the examples-weighted average of round 3's updates.
        (a, b) = (trainers[0][1][-1], trainers[1][1][-1])
        for name in START:
            expected = (a[name].astype(np.float64) * 10 + b[name] * 20) / 30
            np.testing.assert_allclose(current.params[name], expected, rtol=0, atol=1e-6)
    finally:
        session.delete()


def test_a_retried_update_counts_once_and_a_reused_key_is_refused(client: Client) -> None:
    session = client.create_session(
        {"name": "FedAvg"}, START, aggregation={"mode": "rounds", "clients_per_round": 3}
    )
    try:
        me = FederatedClient(client, session.id, "a")
        current = me.fetch()
        assert current is not None and current.number == 1 and current.proximal_mu == 0.0
        new = {k: v + 1 for k, v in current.params.items()}
        first = me.submit(current, params=new, num_examples=5, idempotency_key="key-a")
        again = me.submit(current, params=new, num_examples=5, idempotency_key="key-a")
        assert not first["duplicate"] and again["duplicate"]
        assert me.round_document()["received"] == 1
        other = FederatedClient(client, session.id, "b")
        with pytest.raises(IdempotencyKeyReused):
            other.submit(current, params=new, num_examples=5, idempotency_key="key-a")
        assert me.fetch(after=1, wait=0.1) is None  # round 1 is still open
    finally:
        session.delete()


def test_async_mode_submits_deltas_from_the_version(client: Client) -> None:
    session = client.create_session({"name": "FedAvg"}, START, aggregation={"mode": "async"})
    try:
        me = FederatedClient(client, session.id, "a")
        current = me.fetch()
        assert current is not None and current.number is None and current.version == 0
        delta = {k: np.ones_like(v) for k, v in current.params.items()}
        reply = me.submit(current, delta=delta)
        assert reply["version"] == 1 and reply["staleness"] == 0
        after = me.next_round(0, timeout=5)
        np.testing.assert_array_equal(after.params["w"], START["w"] + 1)
        with pytest.raises(ValueError, match="exactly one"):
            me.submit(current)
    finally:
        session.delete()


def test_proximal_term_and_gradient_are_fedprox_formula() -> None:
    torch = pytest.importorskip("torch")
    from optserve_client.torch import proximal_term as torch_term

    rng = np.random.default_rng(0)
    local = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    global_ = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    mu = 0.3
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in local.items()}
    # Flower's documented term, mu/2 * ||w - w_global||^2, differentiated by torch.
    reference = mu / 2 * sum(torch.sum((tensors[k] - torch.tensor(global_[k])) ** 2) for k in local)
    reference.backward()
    assert proximal_term(local, global_, mu) == pytest.approx(float(reference.detach()), rel=1e-12)
    for name, grad in proximal_gradient(local, global_, mu).items():
        np.testing.assert_allclose(grad, tensors[name].grad.numpy(), rtol=1e-12, atol=0)
    ours = {k: torch.tensor(v, requires_grad=True) for k, v in local.items()}
    term = torch_term(ours.values(), [torch.tensor(global_[k]) for k in ours], mu)
    term.backward()
    assert float(term.detach()) == pytest.approx(float(reference.detach()), rel=1e-12)
    for name in local:
        np.testing.assert_allclose(ours[name].grad.numpy(), tensors[name].grad.numpy(), rtol=1e-12)
    assert proximal_term(global_, global_, mu) == 0.0
