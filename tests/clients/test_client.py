"""The synchronous client against an in-memory fake of the HTTP API (no server process)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from optserve_client import (
    Client,
    IdempotencyExpired,
    IdempotencyKeyReused,
    ParamsRequired,
    PreconditionFailed,
    RetryPolicy,
    ServerError,
    SessionNotFound,
    TransportError,
    Unauthorized,
    ValidationError,
    _retry,
)
from optserve_client.safetensors import decode

from tests.clients.fake_server import SAFETENSORS, FakeServer

FAST = RetryPolicy(attempts=4, backoff=0.0, jitter=False)


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture(params=["safetensors", "json"])
def client(request: pytest.FixtureRequest, server: FakeServer) -> Iterator[Client]:
    with Client(
        "http://optserve.test", wire=request.param, retry=FAST, transport=server.transport()
    ) as c:
        yield c


def steps(server: FakeServer) -> list[httpx.Request]:
    return [r for r in server.requests if r.url.path.endswith("/step")]


def test_create_sends_the_config_and_returns_a_session(client: Client, server: FakeServer) -> None:
    session = client.create_session(
        {"name": "SGD", "lr": 0.1},
        {"w": (2, 3), "b": (3,)},
        schedule={"name": "StepLR", "step_size": 2},
        clip_grad_norm=1.0,
        labels={"run": "t"},
    )
    body = json.loads(server.requests[-1].content)
    assert body["params"] == {"w": {"shape": [2, 3]}, "b": {"shape": [3]}}
    assert body["schedule"] == {"name": "StepLR", "step_size": 2}
    assert body["clip_grad_norm"] == {"max_norm": 1.0}
    assert body["labels"] == {"run": "t"}
    assert session.shapes == {"w": (2, 3), "b": (3,)}
    assert session.step_count == 0 and not session.holds_params


def test_step_returns_deltas_and_carries_params_and_loss(
    client: Client, server: FakeServer
) -> None:
    session = client.create_session({"name": "SGD", "lr": 0.5}, {"w": (2, 2), "b": (2,)})
    grads = {"w": np.arange(4.0).reshape(2, 2), "b": np.array([1.0, -1.0])}
    params = {"w": np.ones((2, 2)), "b": np.zeros(2)}
    result = session.step(grads, params=params, loss=0.25)
    request = steps(server)[-1]
    assert request.headers["idempotency-key"]
    assert request.url.params["return"] == "delta"
    if client.wire == "safetensors":
        assert request.headers["content-type"] == SAFETENSORS
        sent, meta = decode(request.content)
        assert set(sent) == {"w", "b", "params/w", "params/b"}
        assert float(meta["loss"]) == 0.25
        assert sent["w"].dtype == np.float32
    else:
        sent_json = json.loads(request.content)
        assert sent_json["loss"] == 0.25 and set(sent_json["params"]) == {"w", "b"}
    assert result.step == 1 and result.applied and result.lr == [0.5]
    assert result.deltas is not None
    np.testing.assert_array_equal(result.deltas["w"], -0.5 * grads["w"].astype(np.float32))
    assert result.deltas["w"].dtype == np.float32 and result.deltas["w"].shape == (2, 2)
    assert session.step_count == 1 and result.etag == '"1"'


def test_one_tensor_sessions_take_a_bare_array(client: Client) -> None:
    session = client.create_session({"name": "SGD", "lr": 1.0}, {"x": (3,)}, dtype="float64")
    result = session.step(np.array([1.0, 2.0, 3.0]))
    assert result.deltas is not None
    np.testing.assert_array_equal(result.deltas["x"], [-1.0, -2.0, -3.0])
    assert result.deltas["x"].dtype == np.float64


def test_scalar_tensors_keep_their_empty_shape(client: Client, server: FakeServer) -> None:
    session = client.create_session(
        {"name": "SGD", "lr": 0.5}, {"bias": np.array(1.0), "w": np.ones(2)}, dtype="float64"
    )
    assert session.shapes == {"bias": (), "w": (2,)}
    result = session.step({"bias": 4.0, "w": np.zeros(2)}, returns="params")
    assert result.params is not None and result.params["bias"].shape == ()
    assert float(result.params["bias"]) == -1.0


def test_a_list_is_neither_shape_nor_values(client: Client, server: FakeServer) -> None:
    with pytest.raises(TypeError, match="ambiguous"):
        client.create_session({"name": "SGD"}, {"w": [3, 2]})
    with pytest.raises(ValueError, match="every tensor or none"):
        client.create_session({"name": "SGD"}, {"w": np.ones(2), "b": (2,)})
    assert not server.requests
    session = client.create_session(
        {"name": "SGD"}, {"w": np.ones(2), "b": (2,)}, hold_params=False
    )
    assert not session.holds_params and session.shapes == {"w": (2,), "b": (2,)}


def test_wrong_tensors_are_refused_before_sending(client: Client, server: FakeServer) -> None:
    session = client.create_session({"name": "SGD"}, {"w": (2,), "b": (1,)})
    with pytest.raises(ValueError, match="missing tensors"):
        session.step({"w": np.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        session.step({"w": np.zeros(3), "b": np.zeros(1)})
    with pytest.raises(ValueError, match="several tensors"):
        session.step(np.zeros(2))
    assert not steps(server)


def test_held_params_are_uploaded_and_served(client: Client, server: FakeServer) -> None:
    start = {"w": np.array([[1.0, 2.0]]), "b": np.array([3.0])}
    session = client.create_session({"name": "SGD", "lr": 0.1}, start, dtype="float64")
    assert session.holds_params
    create = server.requests[-1]
    if client.wire == "safetensors":
        assert create.headers["content-type"] == SAFETENSORS
    else:
        assert json.loads(create.content)["params"]["w"]["data"] == [[1.0, 2.0]]
    result = session.step({"w": np.array([[1.0, 1.0]]), "b": np.array([2.0])}, returns="params")
    assert result.params is not None
    np.testing.assert_allclose(result.params["w"], [[0.9, 1.9]])
    np.testing.assert_allclose(session.params()["b"], [2.8])


def test_retry_after_a_connection_error_reuses_the_idempotency_key(
    client: Client, server: FakeServer
) -> None:
    session = client.create_session({"name": "SGD", "lr": 1.0}, {"x": (1,)})
    server.fail_next(httpx.ReadError("connection reset"), 503)
    result = session.step(np.array([2.0]))
    assert result.step == 1
    keys = {r.headers["idempotency-key"] for r in steps(server)}
    assert len(steps(server)) == 3 and len(keys) == 1


def test_a_lost_reply_is_replayed_not_applied_twice(client: Client, server: FakeServer) -> None:
    session = client.create_session({"name": "SGD", "lr": 1.0}, {"x": (1,)})
    server.lose_next_replies(1)
    first = session.step(np.array([1.0]))
    # The first try was applied and its reply lost; the retry got the stored reply.
    assert first.step == 1 and first.replayed and len(steps(server)) == 2
    second = session.step(np.array([1.0]))
    assert second.step == 2 and not second.replayed
    assert server.sessions[session.id].step == 2


def test_step_in_flight_is_retried_then_succeeds(client: Client, server: FakeServer) -> None:
    session = client.create_session({"name": "SGD"}, {"x": (1,)})
    server.fail_next((409, {"type": "/problems/step-in-flight"}, {}))
    result = session.step(np.array([1.0]))
    assert result.step == 1 and len(steps(server)) == 2


def test_other_conflicts_are_not_retried(client: Client, server: FakeServer) -> None:
    session = client.create_session({"name": "SGD"}, {"x": (1,)})
    server.fail_next((409, {"type": "/problems/idempotency-expired", "applied_at_step": 7}, {}))
    with pytest.raises(IdempotencyExpired) as expired:
        session.step(np.array([1.0]))
    assert expired.value.applied_step == 7 and len(steps(server)) == 1


def test_persistent_server_errors_give_up_after_the_configured_attempts(
    client: Client, server: FakeServer
) -> None:
    session = client.create_session({"name": "SGD"}, {"x": (1,)})
    server.fail_next(*([500] * FAST.attempts))
    with pytest.raises(ServerError) as caught:
        session.step(np.array([1.0]))
    assert caught.value.status == 500
    assert len(steps(server)) == FAST.attempts


def test_transport_errors_become_transport_error_after_retries(server: FakeServer) -> None:
    server.fail_next(*[httpx.ConnectError("refused")] * 3)
    policy = RetryPolicy(attempts=3, backoff=0.0, jitter=False)
    client = Client("http://optserve.test", retry=policy, transport=server.transport())
    with client, pytest.raises(TransportError, match="refused"):
        client.session("nope")
    assert len(server.requests) == 3


def test_create_is_not_retried_once_it_may_have_reached_the_server(server: FakeServer) -> None:
    with Client("http://optserve.test", retry=FAST, transport=server.transport()) as client:
        server.fail_next(500)
        with pytest.raises(ServerError):
            client.create_session({"name": "SGD"}, {"x": (1,)})
        assert len(server.requests) == 1
        server.fail_next(httpx.ReadError("reset"))
        with pytest.raises(TransportError):
            client.create_session({"name": "SGD"}, {"x": (1,)})
        assert len(server.requests) == 2
        # Refused connections never reached it: safe to retry.
        server.fail_next(httpx.ConnectError("refused"))
        session = client.create_session({"name": "SGD"}, {"x": (1,)})
        assert len(server.requests) == 4 and len(server.sessions) == 1
        assert session.id in server.sessions


def test_backoff_grows_and_honours_retry_after(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    monkeypatch.setattr("optserve_client.client.time.sleep", slept.append)
    policy = RetryPolicy(attempts=5, backoff=0.1, max_backoff=0.3, jitter=False)
    with Client("http://optserve.test", retry=policy, transport=server.transport()) as client:
        session = client.create_session({"name": "SGD"}, {"x": (1,)})
        server.fail_next(502, 502, 502, (503, {}, {"retry-after": "0.05"}))
        session.step(np.array([1.0]))
    assert slept == [0.1, 0.2, 0.3, 0.05]


def test_jittered_backoff_stays_under_the_ceiling() -> None:
    policy = RetryPolicy(backoff=0.2, max_backoff=1.0)
    delays = [policy.delay(n) for n in range(8) for _ in range(20)]
    assert all(0.0 <= d <= 1.0 for d in delays)
    assert max(delays) > 0.2  # the ceiling grows with the retry count
    assert _retry.RetryPolicy(jitter=False).delay(0, httpx.Headers({"retry-after": "bad"})) == 0.05


def test_no_retry_policy_fails_on_the_first_error(server: FakeServer) -> None:
    with Client("http://optserve.test", retry=_retry.NO_RETRY, transport=server.transport()) as c:
        session = c.create_session({"name": "SGD"}, {"x": (1,)})
        server.fail_next(503)
        with pytest.raises(ServerError):
            session.step(np.array([1.0]))


def test_problem_documents_become_typed_errors(client: Client, server: FakeServer) -> None:
    with pytest.raises(SessionNotFound) as missing:
        client.session("nope")
    assert missing.value.status == 404 and "no session nope" in str(missing.value)
    with pytest.raises(ValidationError) as invalid:
        client.create_session({"name": "SGD", "lr": -1.0}, {"x": (1,)})
    assert invalid.value.fields == ["optimizer.lr"]
    assert "Invalid learning rate" in str(invalid.value)


def test_returning_params_without_params_is_params_required(client: Client) -> None:
    session = client.create_session({"name": "SGD"}, {"x": (1,)})
    with pytest.raises(ParamsRequired):
        session.step(np.array([1.0]), returns="params")


def test_same_key_other_body_is_refused(client: Client) -> None:
    session = client.create_session({"name": "SGD"}, {"x": (1,)})
    session.step(np.array([1.0]), idempotency_key="k1")
    again = session.step(np.array([1.0]), idempotency_key="k1")
    assert again.replayed and again.step == 1
    with pytest.raises(IdempotencyKeyReused):
        session.step(np.array([2.0]), idempotency_key="k1")


def test_if_match_sends_the_step_and_412_carries_the_etag(
    client: Client, server: FakeServer
) -> None:
    session = client.create_session({"name": "SGD"}, {"x": (1,)})
    session.step(np.array([1.0]), if_match=True)
    assert steps(server)[-1].headers["if-match"] == '"0"'
    with pytest.raises(PreconditionFailed) as stale:
        session.step(np.array([1.0]), if_match=0)
    assert stale.value.etag == '"1"'


def test_api_key_is_sent_as_bearer_token(server: FakeServer) -> None:
    server.api_key = "secret"
    with Client("http://optserve.test", transport=server.transport(), api_key="wrong") as bad:
        with pytest.raises(Unauthorized) as denied:
            bad.create_session({"name": "SGD"}, {"x": (1,)})
        assert denied.value.headers["www-authenticate"] == "Bearer"
    with Client("http://optserve.test", transport=server.transport(), api_key="secret") as good:
        good.create_session({"name": "SGD"}, {"x": (1,)})
    assert server.requests[-1].headers["authorization"] == "Bearer secret"


def test_url_and_key_default_from_the_environment(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPTSERVE_URL", "http://from-env.test/v1/")
    monkeypatch.setenv("OPTSERVE_API_KEY", "k")
    with Client(transport=server.transport()) as client:
        assert client.url == "http://from-env.test"
        assert client.healthy()
    assert server.requests[-1].headers["authorization"] == "Bearer k"


def test_listing_follows_the_cursor_across_pages(client: Client) -> None:
    made = {client.create_session({"name": "SGD"}, {"x": (1,)}).id for _ in range(5)}
    assert {s.id for s in client.sessions()} == made


def test_delete_whose_reply_was_lost_still_succeeds(client: Client, server: FakeServer) -> None:
    session = client.create_session({"name": "SGD"}, {"x": (1,)})
    server.lose_next_replies(1)
    client.delete_session(session.id)
    assert session.id not in server.sessions
    with pytest.raises(SessionNotFound):
        client.delete_session(session.id)
