"""Batches that pay: a heavy graph on the CPU (its one-image run over 20 ms) is measured at start at
1, 2, 4, ... images, and batches are capped where doubling stops raising images/s by 10%; the sizes
past that are never run. /v1/models shows the cap and the figures that chose it."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient

import service.repository
from service.app import create_app
from service.manifest import read_manifest
from service.repository import batch_knee, load_model
from service.runtime import every_core
from service.settings import Settings
from service.tasks import TASKS, manifest_checks
from tests.conftest import SHIPPED_REPOSITORY

SPEC = read_manifest(SHIPPED_REPOSITORY / "vit" / "1").main
SIZES = [1, 2, 4, 8, 16]


def sleeping(seconds: Callable[[int], float]) -> tuple[Callable[[dict[str, np.ndarray]], list[np.ndarray]], list[int]]:
    """A graph whose run of n images takes `seconds(n)`; and the sizes it was run at."""
    ran: list[int] = []

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        ran.append(len(feeds["pixel_values"]))
        time.sleep(seconds(ran[-1]))
        return []

    return run, ran


def test_no_gain_from_batching_keeps_batches_of_one() -> None:
    run, ran = sleeping(lambda n: 0.1 * n)  # every image costs the same (long: a busy host oversleeps ms)
    cap, rates = batch_knee(run, SPEC, SIZES)
    assert cap == 1 and set(rates) == {1, 2} and set(ran) == {1, 2}  # 4, 8 and 16 never run


def test_batching_is_capped_where_it_stops_paying() -> None:
    run, ran = sleeping(lambda n: 0.02 * max(n, 4) / 4)  # the same time up to 4 images, then per image
    cap, rates = batch_knee(run, SPEC, SIZES)
    assert cap == 4 and set(rates) == {1, 2, 4, 8} and 16 not in ran
    assert rates[4] == pytest.approx(4 * rates[1], rel=0.3)


def test_a_run_of_constant_cost_batches_as_far_as_allowed() -> None:
    run, _ = sleeping(lambda n: 0.01)
    assert batch_knee(run, SPEC, SIZES)[0] == 16


def test_a_heavy_models_cap_is_measured_and_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service.repository, "HEAVY_RUN_S", 0.0)  # every run counts as long
    monkeypatch.setattr(service.repository, "BATCH_GAIN", 100.0)  # nothing pays that much: the knee is 1
    with TestClient(create_app(Settings(model_repository=SHIPPED_REPOSITORY))) as client:
        vit = next(m for m in client.get("/v1/models").json()["models"] if m["name"] == "vit")
    assert vit["max_batch_size"]["main"] == 1 and set(vit["batch_rates"]["main"]) == {"1", "2"}
    policy = {"vit": {"max_batch_size": 8.0}}  # a setting decides alone
    with TestClient(create_app(Settings(model_repository=SHIPPED_REPOSITORY, batch_policy=policy))) as client:
        vit = next(m for m in client.get("/v1/models").json()["models"] if m["name"] == "vit")
    assert vit["max_batch_size"]["main"] == 8 and vit["batch_rates"] == {}


def test_the_cap_is_measured_where_the_workers_leave_no_core_to_spare(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--workers` as many as the cores: each worker's ONNX Runtime gets one thread either way, and a
    heavy model still batches only as far as it pays (it warmed every size up to 16 instead: 30 s
    and twice the memory for a ViT-B/16)."""
    monkeypatch.setattr(service.repository, "HEAVY_RUN_S", 0.0)
    monkeypatch.setattr(service.repository, "BATCH_GAIN", 100.0)
    settings = Settings(workers=every_core(), lazy_attention=False)
    model = load_model(SHIPPED_REPOSITORY / "vit", settings, manifest_checks(TASKS))
    assert model.state == "ready", model.reason
    assert model.batchers["main"].policy.max_batch_size == 1 and set(model.batch_rates["main"]) == {1, 2}
