"""ONNX Runtime's threads: every core but one for a model whose one-image run is short (the event
loop keeps a core), every core for a heavy one (measured at load, during warm-up)."""

from __future__ import annotations

import pytest

import service.repository
from service.repository import load_model
from service.runtime import every_core, inference_threads
from service.settings import Settings
from service.tasks import TASKS, manifest_checks
from tests.conftest import SHIPPED_REPOSITORY


def threads(**settings: object) -> dict[str, int]:
    model = load_model(SHIPPED_REPOSITORY / "vit", Settings(lazy_attention=False, **settings), manifest_checks(TASKS))  # type: ignore[arg-type]
    assert model.state == "ready", model.reason
    return {graph: s.get_session_options().intra_op_num_threads for graph, s in model.sessions.items()}


def test_a_light_model_leaves_the_event_loop_a_core() -> None:
    assert threads() == {"main": inference_threads(), "attention": inference_threads()}  # 0.6 ms a digit


def test_a_heavy_model_gets_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service.repository, "HEAVY_RUN_S", 0.0)  # every run counts as long
    assert threads() == {"main": every_core(), "attention": every_core()}
    assert threads(intra_op_threads=1) == {"main": 1, "attention": 1}  # a setting decides alone
    assert threads(warmup=False) == {"main": inference_threads(), "attention": inference_threads()}  # no probe
