"""What loading measured (a heavy graph, its batch knee) is kept beside the repository, so that the
next start on the same host loads without the timing runs; any change to what the figures hold for
(the files, the CPU, the thresholds) measures again, and a repository that cannot be written keeps nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import service.repository
from service import measured
from service.measured import Measured
from service.repository import load_model
from service.runtime import every_core, inference_threads
from service.settings import Settings
from service.tasks import TASKS, manifest_checks
from tests.conftest import SHIPPED_REPOSITORY

KEY = measured.host_key("abc", 2)


def test_kept_figures_come_back_for_their_key_only(tmp_path: Path) -> None:
    path = measured.path_of(tmp_path, "vit", 1, "main")
    assert measured.recall(path, KEY) is None  # nothing kept yet
    measured.remember(path, KEY, Measured(True, 2, {1: 3.5, 2: 7.25, 4: 7.5}))
    assert measured.recall(path, KEY) == Measured(True, 2, {1: 3.5, 2: 7.25, 4: 7.5})
    assert measured.recall(path, measured.host_key("changed", 2)) is None  # other files
    assert measured.recall(path, measured.host_key("abc", 4)) is None  # other cores
    path.write_text("{not json")
    assert measured.recall(path, KEY) is None


def test_a_repository_that_cannot_be_written_keeps_nothing(tmp_path: Path) -> None:
    (tmp_path / measured.FOLDER).write_text("a file where the folder would be")
    measured.remember(measured.path_of(tmp_path, "vit", 1, "main"), KEY, Measured(False))  # no error
    assert (tmp_path / measured.FOLDER).read_text() == "a file where the folder would be"


def load(repository: Path) -> service.repository.ServedModel:
    model = load_model(repository / "vit", Settings(model_repository=repository, lazy_attention=False),
                       manifest_checks(TASKS))  # fmt: skip
    assert model.state == "ready", model.reason
    return model


@pytest.mark.skipif(every_core() == inference_threads(), reason="one core: no model counts as heavy")
def test_a_second_start_loads_a_heavy_model_without_timing_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(SHIPPED_REPOSITORY / "vit", tmp_path / "vit")
    monkeypatch.setattr(service.repository, "HEAVY_RUN_S", 0.0)  # every run counts as long
    monkeypatch.setattr(service.repository, "BATCH_GAIN", 100.0)  # nothing pays that much: the knee is 1
    first = load(tmp_path)
    assert first.batchers["main"].policy.max_batch_size == 1 and set(first.batch_rates["main"]) == {1, 2}

    def timed(*args: object) -> None:
        raise AssertionError("measured again")

    monkeypatch.setattr(service.repository, "runs_long", timed)
    monkeypatch.setattr(service.repository, "batch_knee", timed)
    again = load(tmp_path)
    assert again.batchers["main"].policy.max_batch_size == 1 and again.batch_rates == first.batch_rates
    assert {g: s.get_session_options().intra_op_num_threads for g, s in again.sessions.items()} == {
        "main": every_core(), "attention": every_core()}  # fmt: skip
    monkeypatch.setattr(service.repository, "BATCH_GAIN", 50.0)  # another threshold: measured again
    settings = Settings(model_repository=tmp_path, lazy_attention=False)
    assert "measured again" in str(load_model(tmp_path / "vit", settings, manifest_checks(TASKS)).reason)
