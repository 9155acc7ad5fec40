"""ONNX Runtime's threads: every core but one for a model whose one-image run is short (the event
loop keeps a core), every core for a heavy one (measured at load, during warm-up); a heavy graph's
idle threads spin briefly between operators, a light one's sleep at once."""

from __future__ import annotations

import onnxruntime as ort
import pytest

import service.repository
from service.repository import load_model
from service.runtime import every_core, inference_threads, session_options
from service.settings import Settings
from service.tasks import TASKS, manifest_checks
from tests.conftest import SHIPPED_REPOSITORY


def sessions(**settings: object) -> dict[str, ort.InferenceSession]:
    model = load_model(SHIPPED_REPOSITORY / "vit", Settings(lazy_attention=False, **settings), manifest_checks(TASKS))  # type: ignore[arg-type]
    assert model.state == "ready", model.reason
    return model.sessions


def threads(**settings: object) -> dict[str, int]:
    return {graph: s.get_session_options().intra_op_num_threads for graph, s in sessions(**settings).items()}


def spinning(options: ort.SessionOptions) -> tuple[str, str | None]:
    """allow_spinning, and spin_duration_us where set."""
    try:
        duration: str | None = options.get_session_config_entry("session.intra_op.spin_duration_us")
    except Exception:  # not set: ONNX Runtime's own duration
        duration = None
    return options.get_session_config_entry("session.intra_op.allow_spinning"), duration


def test_a_light_model_leaves_the_event_loop_a_core() -> None:
    assert threads() == {"main": inference_threads(), "attention": inference_threads()}  # 0.6 ms a digit


def test_a_heavy_model_gets_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service.repository, "HEAVY_RUN_S", 0.0)  # every run counts as long
    assert threads() == {"main": every_core(), "attention": every_core()}
    assert threads(intra_op_threads=1) == {"main": 1, "attention": 1}  # a setting decides alone
    assert threads(warmup=False) == {"main": inference_threads(), "attention": inference_threads()}  # no probe


def test_only_a_heavy_graphs_threads_spin_and_briefly(monkeypatch: pytest.MonkeyPatch) -> None:
    light = {graph: spinning(s.get_session_options()) for graph, s in sessions().items()}
    assert light == {"main": ("0", None), "attention": ("0", None)}
    monkeypatch.setattr(service.repository, "HEAVY_RUN_S", 0.0)
    heavy = {graph: spinning(s.get_session_options()) for graph, s in sessions().items()}
    assert heavy == {"main": ("1", "200"), "attention": ("1", "200")}
    quiet = {graph: spinning(s.get_session_options()) for graph, s in sessions(heavy_spin_us=0).items()}
    assert quiet == {"main": ("0", None), "attention": ("0", None)}  # sleep at once, as a light graph's


def test_spin_wait_lets_every_thread_spin_as_onnx_runtime_likes() -> None:
    assert spinning(session_options(Settings(spin_wait=True))) == ("1", None)
    assert spinning(session_options(Settings(spin_wait=True), 2, 200)) == ("1", None)
    assert spinning(session_options(Settings(), 2, 200)) == ("1", "200")
    assert spinning(session_options(Settings())) == ("0", None)
