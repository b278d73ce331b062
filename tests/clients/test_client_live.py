"""The numpy client against a live server: numbers, both wire formats, and every error
family a training loop meets."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from optserve_client import (
    AsyncClient,
    Client,
    IdempotencyKeyReused,
    InvalidHyperparameter,
    InvalidInput,
    ParamsNotHeld,
    PreconditionFailed,
    SessionNotFound,
    Unauthorized,
    ValidationError,
)
from optserve_client._wire import Wire

from tests.clients import client_parity as parity


def expected_run() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """torch's numbers when torch is importable, else the committed golden file."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return parity.golden()
    return parity.torch_reference()


def run_parity_scenario(live_url: str, wire: Wire) -> tuple[dict[str, np.ndarray], np.ndarray]:
    config = dict(parity.CONFIG)
    with Client(live_url, wire=wire) as client:
        session = client.create_session(
            config.pop("optimizer"), {n: s for n, s in parity.SHAPES.items()}, **config
        )
        params = parity.initial_params()
        lrs = []
        for step in range(parity.STEPS):
            lrs.append(session.lr)
            result = session.step(parity.gradients(params, step), params=params)
            assert result.deltas is not None and result.step == step + 1
            params = {n: params[n] + result.deltas[n] for n in params}
        session.delete()
    return params, np.array(lrs)


@pytest.mark.parametrize("wire", ["safetensors", "json"])
def test_training_run_matches_torch_to_1e10(live_url: str, wire: Wire) -> None:
    params, lrs = run_parity_scenario(live_url, wire)
    want_params, want_lrs = expected_run()
    np.testing.assert_allclose(lrs, want_lrs, rtol=1e-12)
    for name in parity.SHAPES:
        np.testing.assert_allclose(params[name], want_params[name], rtol=1e-10, atol=1e-12)
    start = parity.initial_params()
    assert max(np.abs(params[n] - start[n]).max() for n in start) > 0.1


def test_golden_file_is_what_torch_computes() -> None:
    pytest.importorskip("torch", reason="the golden file is regenerated from torch")
    fresh_params, fresh_lrs = parity.torch_reference()
    golden_params, golden_lrs = parity.golden()
    np.testing.assert_array_equal(fresh_lrs, golden_lrs)
    for name in parity.SHAPES:
        np.testing.assert_allclose(fresh_params[name], golden_params[name], rtol=1e-14)


def test_json_and_safetensors_carry_the_same_bits(live_url: str) -> None:
    results = []
    for wire in ("safetensors", "json"):
        with Client(live_url, wire=wire) as client:
            session = client.create_session(
                {"name": "Adam", "lr": 0.1}, {"w": (3, 2), "scale": ()}, dtype="float64"
            )
            grads = np.random.default_rng(0).standard_normal((3, 2)) * 1e-7
            result = session.step({"w": grads, "scale": np.array(0.3)})
            assert result.deltas is not None and result.deltas["scale"].shape == ()
            results.append(result.deltas)
    for name in ("w", "scale"):
        np.testing.assert_array_equal(results[0][name], results[1][name])


def test_held_params_state_and_restore_continue_exactly(client: Client) -> None:
    start = {"w": np.linspace(-1, 1, 6).reshape(2, 3), "b": np.zeros(3)}
    session = client.create_session(
        {"name": "SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
        start,
        dtype="float64",
        schedule={"name": "ExponentialLR", "gamma": 0.9},
    )
    assert session.holds_params and session.document["needs_params"]
    rng = np.random.default_rng(3)
    grads = [{"w": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)} for _ in range(8)]
    for g in grads[:4]:
        session.step(g, returns="none")
    checkpoint = session.state()
    for g in grads[4:]:
        last = session.step(g, returns="params")
    restored = client.restore(checkpoint)
    assert restored.step_count == 4 and restored.id != session.id
    for g in grads[4:]:
        restored.step(g, returns="none")
    assert last.params is not None
    for name, values in restored.params().items():
        np.testing.assert_array_equal(values, last.params[name])
        np.testing.assert_array_equal(session.params()[name], values)


def test_idempotent_replay_and_key_reuse(client: Client) -> None:
    session = client.create_session({"name": "SGD", "lr": 1.0}, {"x": (2,)})
    first = session.step(np.array([1.0, 2.0]), idempotency_key="step-1")
    again = session.step(np.array([1.0, 2.0]), idempotency_key="step-1")
    assert again.replayed and not first.replayed and again.step == first.step == 1
    assert first.deltas is not None and again.deltas is not None
    np.testing.assert_array_equal(again.deltas["x"], first.deltas["x"])
    assert session.refresh().step_count == 1
    with pytest.raises(IdempotencyKeyReused):
        session.step(np.array([5.0, 5.0]), idempotency_key="step-1")


def test_if_match_refuses_a_stale_step(client: Client) -> None:
    session = client.create_session({"name": "SGD"}, {"x": (1,)})
    session.step(np.array([1.0]), if_match=True)
    with pytest.raises(PreconditionFailed) as stale:
        session.step(np.array([1.0]), if_match=0)
    assert stale.value.etag == '"1"'


def test_nonfinite_gradients_skip_or_fail(client: Client) -> None:
    skipping = client.create_session({"name": "Adam"}, {"x": (2,)}, nonfinite="skip")
    result = skipping.step(np.array([np.nan, 1.0]))
    assert not result.applied and result.skipped and "NaN" in result.skipped
    assert skipping.refresh().document["skipped_steps"] == 1 and skipping.step_count == 0
    strict = client.create_session({"name": "Adam"}, {"x": (2,)})
    with pytest.raises(InvalidInput) as refused:
        strict.step(np.array([np.inf, 1.0]))
    assert refused.value.fields == ["grads.x"]


def test_bad_input_names_the_field(client: Client) -> None:
    with pytest.raises(InvalidHyperparameter) as bad:
        client.create_session({"name": "AdamW", "betas": [1.5, 0.9]}, {"x": (1,)})
    assert bad.value.fields == ["optimizer.betas"] and "1.5" in str(bad.value)
    decayed = client.create_session({"name": "AdamW"}, {"x": (1,)})
    with pytest.raises(ValidationError, match="params"):
        decayed.step(np.array([1.0]))
    with pytest.raises(ParamsNotHeld):
        decayed.params()
    with pytest.raises(SessionNotFound):
        client.session("no-such-session")


def test_manual_plateau_schedule_follows_the_metric(client: Client) -> None:
    session = client.create_session(
        {"name": "SGD", "lr": 1.0},
        {"x": (1,)},
        schedule={"name": "ReduceLROnPlateau", "patience": 1, "factor": 0.5, "interval": "manual"},
    )
    for metric in (1.0, 1.0, 1.0):
        session.schedule_step(metric)
    assert session.lr == [0.5]
    assert session.refresh().lr == [0.5]


def test_listing_catalog_and_preview(client: Client) -> None:
    made = {client.create_session({"name": "SGD"}, {"x": (1,)}).id for _ in range(3)}
    assert made <= {s.id for s in client.sessions(page_size=2)}
    optimizers = {o["name"]: o for o in client.optimizers()}
    assert "AdamW" in optimizers
    assert "weight_decay" in {a["name"] for a in optimizers["AdamW"]["args"]}
    assert "SequentialLR" in {s["name"] for s in client.schedules()}
    lrs = client.preview({"name": "SGD", "lr": 1.0}, {"name": "StepLR", "step_size": 2}, steps=5)
    np.testing.assert_allclose(lrs, [[1.0], [1.0], [0.1], [0.1], [0.01]], rtol=1e-12)
    assert client.healthy() and client.ready()


def test_tenants_are_isolated(live_url_with_keys: str) -> None:
    with Client(live_url_with_keys, api_key="key-alice") as alice:
        mine = alice.create_session({"name": "SGD"}, {"x": (1,)})
        with Client(live_url_with_keys, api_key="key-bob") as bob:
            with pytest.raises(SessionNotFound):
                bob.session(mine.id)
            assert mine.id not in {s.id for s in bob.sessions()}
        for key in ("wrong", ""):
            with Client(live_url_with_keys, api_key=key) as stranger:
                with pytest.raises(Unauthorized) as denied:
                    stranger.session(mine.id)
                assert "Bearer" in denied.value.headers["www-authenticate"]
        assert alice.session(mine.id).id == mine.id


def test_async_client_steps_sessions_concurrently(live_url: str) -> None:
    async def train(client: AsyncClient, seed: int) -> tuple[np.ndarray, np.ndarray]:
        session = await client.create_session(
            {"name": "SGD", "lr": 0.5, "momentum": 0.5}, {"w": (4,)}, dtype="float64"
        )
        rng = np.random.default_rng(seed)
        w = rng.standard_normal(4)
        expected, buffer = w.copy(), np.zeros(4)
        for step in range(10):
            grad = rng.standard_normal(4)
            result = await session.step({"w": grad})
            assert result.deltas is not None
            w += result.deltas["w"]
            buffer = grad if step == 0 else 0.5 * buffer + grad
            expected -= 0.5 * buffer
        await session.delete()
        return w, expected

    async def main() -> list[tuple[np.ndarray, np.ndarray]]:
        async with AsyncClient(live_url) as client:
            return await asyncio.gather(*(train(client, seed) for seed in range(4)))

    for got, want in asyncio.run(main()):
        np.testing.assert_allclose(got, want, rtol=1e-12)
