"""Session lifecycle: create, read, list, delete; tenancy; limits; catalog and preview."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.errors import InvalidHyperparameter, InvalidInput, UnknownName
from service.sessions.errors import LimitExceeded, ParamsNotHeld, ParamsRequired, SessionNotFound
from service.sessions.ids import is_valid
from service.sessions.models import Limits
from service.sessions.store import MemoryStore
from tests.sessions.conftest import StoreFactory, running

pytestmark = pytest.mark.anyio

CONFIG = {
    "optimizer": {"name": "AdamW", "lr": 0.01},
    "schedule": {"name": "StepLR", "step_size": 2, "gamma": 0.5},
    "params": {"w": {"shape": [3, 2]}, "b": {"shape": [2]}},
    "param_groups": [{"params": ["b"], "weight_decay": 0.0}],
    "labels": {"run": "r1"},
}


async def test_create_resolves_the_config_and_reads_back() -> None:
    async with running(MemoryStore()) as service:
        info = await service.create("t", CONFIG, None)
        doc = info.document()
        assert is_valid(info.id)
        assert doc["step"] == 0 and info.etag == '"0"'
        assert doc["optimizer"]["name"] == "AdamW"
        assert doc["optimizer"]["betas"] == [0.9, 0.999]  # default filled in
        assert doc["optimizer"]["weight_decay"] == 0.01
        assert doc["lr"] == [0.01, 0.01]
        assert [g["params"] for g in doc["param_groups"]] == [["w"], ["b"]]
        assert doc["param_groups"][1]["weight_decay"] == 0.0
        assert doc["tensors"] == {"w": {"shape": [3, 2]}, "b": {"shape": [2]}}
        assert doc["labels"] == {"run": "r1"}
        assert doc["holds_params"] is False and doc["needs_params"] is True
        assert doc["created_at"].endswith("Z")
        assert (await service.get("t", info.id)).document() == doc


async def test_tensor_data_in_the_config_is_ignored_not_stored() -> None:
    config = {"optimizer": {"name": "SGD"}, "params": {"w": {"shape": [2], "data": [1, 2]}}}
    store = MemoryStore()
    async with running(store) as service:
        info = await service.create("t", config, None)
        assert info.holds_params is False
    [stored] = list(store.load())
    assert stored.record.config["params"] == {"w": {"shape": [2]}}


async def test_bad_configs_name_the_field() -> None:
    async with running(MemoryStore()) as service:
        with pytest.raises(InvalidHyperparameter) as bad_beta:
            await service.create(
                "t",
                {
                    "optimizer": {"name": "Adam", "betas": [0.9, 1.5]},
                    "params": {"w": {"shape": [1]}},
                },
                None,
            )
        assert bad_beta.value.argument == "optimizer.betas"
        with pytest.raises(InvalidHyperparameter) as bad_label:
            await service.create("t", {**CONFIG, "labels": {"k": 3}}, None)
        assert bad_label.value.argument == "labels.k"
        with pytest.raises(InvalidHyperparameter):
            await service.create("t", {**CONFIG, "optimizer": {"name": "Nope"}}, None)
        with pytest.raises(InvalidHyperparameter):
            await service.create("t", "not an object", None)  # type: ignore[arg-type]
        sessions, _ = await service.list("t", 10, None)
        assert sessions == []


async def test_initial_params_make_a_parameter_server() -> None:
    config = {"optimizer": {"name": "SGD", "lr": 0.5}, "params": {"w": {"shape": [2, 2]}}}
    async with running(MemoryStore()) as service:
        values = np.arange(4, dtype=np.float64)  # flat, and float64: cast and reshaped
        info = await service.create("t", config, {"w": values})
        assert info.holds_params
        held = await service.params("t", info.id)
        assert held["w"].dtype == np.float32 and held["w"].shape == (2, 2)
        assert held["w"].ravel().tolist() == [0.0, 1.0, 2.0, 3.0]
        held["w"][...] = 7  # a copy: the session is unaffected
        assert (await service.params("t", info.id))["w"][0, 0] == 0.0


async def test_initial_params_must_cover_every_tensor_and_be_finite() -> None:
    config = {"optimizer": {"name": "SGD"}, "params": {"w": {"shape": [2]}, "b": {"shape": [1]}}}
    async with running(MemoryStore()) as service:
        with pytest.raises(InvalidInput) as missing:
            await service.create("t", config, {"w": np.zeros(2)})
        assert missing.value.field == "params.b"
        with pytest.raises(InvalidInput) as shape:
            await service.create("t", config, {"w": np.zeros(3), "b": np.zeros(1)})
        assert shape.value.field == "params.w"
        with pytest.raises(InvalidInput) as nan:
            await service.create("t", config, {"w": np.array([1.0, np.nan]), "b": np.zeros(1)})
        assert nan.value.field == "params.w"
        with pytest.raises(InvalidInput):
            await service.create(
                "t", config, {"w": np.zeros(2), "b": np.zeros(1), "x": np.zeros(1)}
            )


async def test_params_of_a_session_that_holds_none() -> None:
    async with running(MemoryStore()) as service:
        info = await service.create("t", CONFIG, None)
        with pytest.raises(ParamsNotHeld):
            await service.params("t", info.id)


async def test_lbfgs_ask_tell_needs_held_params() -> None:
    config = {
        "optimizer": {"name": "LBFGS", "line_search_fn": "strong_wolfe"},
        "params": {"x": {"shape": [2]}},
    }
    async with running(MemoryStore()) as service:
        with pytest.raises(ParamsRequired):
            await service.create("t", config, None)
        info = await service.create("t", config, {"x": np.zeros(2)})
        assert info.document()["ask_tell"] is True


async def test_tenants_never_see_each_others_sessions() -> None:
    async with running(MemoryStore()) as service:
        mine = await service.create("a", CONFIG, None)
        await service.create("b", CONFIG, None)
        for call in (
            service.get("b", mine.id),
            service.delete("b", mine.id),
            service.params("b", mine.id),
            service.export_state("b", mine.id),
            service.schedule_step("b", mine.id, None),
        ):
            with pytest.raises(SessionNotFound):
                await call
        listed, _ = await service.list("b", 10, None)
        assert mine.id not in [s.id for s in listed]
        assert (await service.get("a", mine.id)).id == mine.id


async def test_list_pages_in_creation_order() -> None:
    async with running(MemoryStore()) as service:
        made = [(await service.create("t", CONFIG, None)).id for _ in range(5)]
        await service.create("other", CONFIG, None)
        page, cursor = await service.list("t", 2, None)
        seen = [s.id for s in page]
        while cursor is not None:
            page, cursor = await service.list("t", 2, cursor)
            seen += [s.id for s in page]
        assert seen == made
        with pytest.raises(InvalidInput):
            await service.list("t", 0, None)


async def test_delete_removes_the_session_for_good(store_factory: StoreFactory) -> None:
    async with running(store_factory()) as service:
        info = await service.create("t", CONFIG, None)
        keep = await service.create("t", CONFIG, None)
        await service.delete("t", info.id)
        with pytest.raises(SessionNotFound):
            await service.get("t", info.id)
        with pytest.raises(SessionNotFound):
            await service.delete("t", info.id)
    async with running(store_factory()) as service:
        listed, _ = await service.list("t", 10, None)
        assert [s.id for s in listed] == [keep.id]


async def test_limits_on_sessions_tensors_and_elements() -> None:
    limits = Limits(
        max_tensors_per_session=2, max_elements_per_session=10, max_sessions_per_tenant=2
    )
    async with running(MemoryStore(), limits) as service:
        config = {"optimizer": {"name": "SGD"}, "params": {"w": {"shape": [2, 5]}}}
        first = await service.create("t", config, None)
        await service.create("t", config, None)
        with pytest.raises(LimitExceeded) as too_many:
            await service.create("t", config, None)
        assert too_many.value.limit == "sessions per tenant"
        await service.create("u", config, None)  # per tenant
        await service.delete("t", first.id)
        await service.create("t", config, None)  # a slot was freed
        big = {"optimizer": {"name": "SGD"}, "params": {"w": {"shape": [11]}}}
        with pytest.raises(LimitExceeded) as elements:
            await service.create("u", big, None)
        assert elements.value.limit == "elements per session"
        wide = {"optimizer": {"name": "SGD"}, "params": {n: {"shape": [1]} for n in "abc"}}
        with pytest.raises(LimitExceeded) as tensors:
            await service.create("u", wide, None)
        assert tensors.value.limit == "tensors per session"


async def test_catalogs_list_every_optimizer_and_schedule() -> None:
    async with running(MemoryStore()) as service:
        names = {o["name"] for o in service.catalog_optimizers()}
        assert {"SGD", "Adam", "AdamW", "LBFGS"} <= names
        sgd = next(o for o in service.catalog_optimizers() if o["name"] == "SGD")
        assert {"name": "lr", "type": "float", "default": 0.001} in [
            {k: a[k] for k in ("name", "type", "default")} for a in sgd["args"]
        ]
        schedules = service.catalog_schedules()
        assert {"StepLR", "CosineAnnealingLR", "ReduceLROnPlateau"} <= {
            s["name"] for s in schedules
        }
        assert {o["name"] for o in schedules[0]["options"]} == {"interval", "every"}


async def test_preview_gives_the_lr_per_step_per_group() -> None:
    async with running(MemoryStore()) as service:
        lrs = service.preview_document(
            {"name": "SGD", "lr": 1.0},
            {"name": "StepLR", "step_size": 2, "gamma": 0.5},
            5,
            [{"params": ["head"], "lr": 0.1}],
        )["lr"]
        assert len(lrs) == 5
        assert [round(step[0], 12) for step in lrs] == [1.0, 1.0, 0.5, 0.5, 0.25]
        assert [round(step[1], 12) for step in lrs] == [0.1, 0.1, 0.05, 0.05, 0.025]
        document = service.preview_document({"name": "SGD", "lr": 0.3}, None, 2)
        assert document == {"lr": [[0.3], [0.3]], "optimizers": ["SGD"]}
        with pytest.raises(InvalidHyperparameter) as steps:
            service.preview_document({"name": "SGD"}, None, 0)
        assert steps.value.argument == "steps"
        with pytest.raises((InvalidHyperparameter, UnknownName)):
            service.preview_document({"name": "SGD"}, {"name": "NoSuchLR"}, 3)
