"""``/ui`` in headless Chromium: it lists this tenant's sessions and, for one session, plots
what the API returns (lr per group; participation and update norms per round for a
federated session), with no console errors and no request to another host.

With ``UI_SCREENSHOT=path.png`` set, the federated session's view is saved there (the
README's screenshot is made so).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.browser.chromium import Watched, browser_page
from tests.e2e.server_process import ServerProcess, running_server

KEY = "ui-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("ui-page")
    env = {"OPTSERVE_API_KEYS": f"team:{KEY},other:other-key"}
    with running_server(root, env) as process:
        yield process


def _post(server: ServerProcess, path: str, body: dict[str, Any], key: str = KEY) -> Any:
    response = httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code in (200, 201), response.text
    return response.json()


def _trained(server: ServerProcess) -> str:
    config = {
        "optimizer": {"name": "SGD", "lr": 0.1, "momentum": 0.9},
        "schedule": {"name": "StepLR", "step_size": 2, "gamma": 0.5},
        "params": {"w": {"shape": [2]}, "b": {"shape": [1]}},
        "param_groups": [{"params": ["b"], "lr": 0.02}],
        "labels": {"run": "ui-test"},
    }
    session: str = _post(server, "/v1/sessions", config)["id"]
    for step in range(5):
        grads = {"w": [1.0, -1.0], "b": [0.5]}
        _post(server, f"/v1/sessions/{session}/step", {"grads": grads, "loss": 1.0 / (step + 1)})
        if step == 2:
            edit = {"lr": 0.03, "reason": "slower"}
            response = httpx.patch(
                f"{server.url}/v1/sessions/{session}/param_groups/0", json=edit, headers=AUTH
            )
            assert response.status_code == 200
    return session


def _federated(server: ServerProcess) -> str:
    config = {
        "optimizer": {"name": "FedAvg"},
        "params": {"w": {"shape": [2], "data": [0.0, 0.0]}},
        "aggregation": {"mode": "rounds", "clients_per_round": 3, "min_clients": 2},
    }
    session: str = _post(server, "/v1/sessions", config)["id"]
    for round_ in (1, 2, 3):
        for client in range(3):
            update = {
                "client_id": f"c{client}",
                "round": round_,
                "num_examples": 10 + client,
                "params": {"w": [0.1 * round_ * (client + 1), -0.2 * round_]},
            }
            _post(server, f"/v1/sessions/{session}/updates", update)
    return session


def _open(watched: Watched, url: str, session: str) -> None:
    page = watched.page
    # the key as a person left it typed in the page (without one, the first listing is a
    # 401, which the browser logs to the console by itself)
    page.add_init_script(f"localStorage.setItem('optserve.apiKey', {json.dumps(KEY)})")
    page.goto(url + "/ui")
    assert page.input_value("#key") == KEY
    page.wait_for_selector(f'#sessions tr[data-id="{session}"]')
    page.click(f'#sessions tr[data-id="{session}"]')
    page.wait_for_function(
        f"document.getElementById('status').textContent.startsWith('session {session}')"
    )


def _series(watched: Watched, plot: str) -> dict[str, list[float]]:
    found = watched.page.eval_on_selector_all(
        f'svg[data-plot="{plot}"] [data-series]',
        "nodes => nodes.map(n => [n.dataset.series, n.dataset.values])",
    )
    return {name: json.loads(values) for name, values in found}


def test_ui_lists_the_tenants_sessions_and_plots_one(server: ServerProcess) -> None:
    session = _trained(server)
    hidden = _post(
        server,
        "/v1/sessions",
        {"optimizer": {"name": "Adam"}, "params": {"w": {"shape": [1]}}},
        key="other-key",
    )["id"]
    changes = httpx.get(f"{server.url}/v1/sessions/{session}/changes", headers=AUTH).json()
    history = httpx.get(f"{server.url}/v1/sessions/{session}/steps", headers=AUTH).json()["steps"]
    assert len(history) == 5
    listed = httpx.get(f"{server.url}/v1/sessions", headers=AUTH).json()["sessions"]
    with browser_page() as watched:
        _open(watched, server.url, session)
        page = watched.page
        rows = page.eval_on_selector_all(
            "#sessions tr[data-id]", "rows => rows.map(r => r.dataset.id)"
        )
        assert sorted(rows) == sorted(s["id"] for s in listed)
        assert hidden not in rows
        # The plots are the step history's numbers: lr per group, loss and grad norm.
        lr = _series(watched, "plot-lr")
        assert list(lr) == ["group 0", "group 1"]
        for group, values in enumerate(lr.values()):
            assert values == pytest.approx([r["lr"][group] for r in history])
        assert _series(watched, "plot-loss")["loss"] == pytest.approx(
            [r["metrics"]["loss"] for r in history]
        )
        assert _series(watched, "plot-grad")["grad norm"] == pytest.approx(
            [r["metrics"]["grad_norm"] for r in history]
        )
        assert lr["group 0"][3] == changes["changes"][0]["new"]  # the edit before step 4
        log = page.eval_on_selector_all(
            "#changes tbody tr", "rows => rows.map(r => r.cells[2].textContent)"
        )
        assert log == [c["field"] for c in changes["changes"]]
        groups = page.inner_text("#groups")
        assert "momentum" in groups and "b" in groups
        assert page.is_hidden("#fig-participation")
        assert watched.errors == []
        assert watched.foreign(server.url) == []


def test_ui_plots_participation_and_update_norms_per_round(server: ServerProcess) -> None:
    session = _federated(server)
    rounds = httpx.get(f"{server.url}/v1/sessions/{session}/rounds", headers=AUTH).json()
    assert len(rounds["rounds"]) == 3
    with browser_page() as watched:
        _open(watched, server.url, session)
        page = watched.page
        # "attached", not "visible": a flat series is a path with no height, which
        # Playwright counts as invisible.
        page.wait_for_selector('svg[data-plot="plot-norms"] [data-series]', state="attached")
        participation = _series(watched, "plot-participation")["participants"]
        assert participation == [len(r["participants"]) for r in rounds["rounds"]]
        norms = _series(watched, "plot-norms")
        assert norms["server step"] == pytest.approx(
            [r["pseudo_gradient_norm"] for r in rounds["rounds"]]
        )
        means = [
            sum(p["update_norm"] for p in r["participants"]) / len(r["participants"])
            for r in rounds["rounds"]
        ]
        assert norms["mean client"] == pytest.approx(means)
        assert watched.errors == []
        assert watched.foreign(server.url) == []
        target = os.environ.get("UI_SCREENSHOT")
        if target:
            page.screenshot(path=target, full_page=True)
