"""The `vitserve` command's pieces that need no server: delegation, the missing extras, the output
file's repair, the client's independence of the server."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from service.settings import PROJECT_ROOT
from vitserve import cli
from vitserve.predict import PredictError, done_paths, predict


def test_serve_and_import_take_the_flags_of_their_modules(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["serve", "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: vitserve serve") and "--model-control-mode" in shown


def test_import_says_which_extras_are_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "transformers" else found(name))
    assert cli.main(["import", "some/dir", "--name", "mine"]) == 2
    said = capsys.readouterr().err
    assert "transformers" in said and "torch" not in said and "vitserve[cpu,train,hf]" in said


def test_an_interrupted_line_is_cut_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.jsonl"
    whole = '{"path": "a.png", "results": []}\n{"path": "b/c.png", "results": []}\n'
    out.write_text(whole + '{"path": "d.p')
    assert done_paths(out) == ["a.png", "b/c.png"]
    assert out.read_text() == whole and "dropped 13 bytes" in capsys.readouterr().err
    assert done_paths(out) == ["a.png", "b/c.png"] and done_paths(tmp_path / "none.jsonl") == []


def test_table() -> None:
    assert cli.table(["image", "label"], [["a.png", "7"], ["long-name.png", "1"]]).splitlines() == [
        "image          label", "-------------  -----", "a.png          7", "long-name.png  1"
    ]  # fmt: skip


def test_the_client_and_command_import_nothing_of_the_server() -> None:
    server = ("service", "onnxruntime", "fastapi", "numpy", "torch")
    script = f"import sys, vitserve, vitserve.cli; print(sorted(m for m in {server} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr


@pytest.mark.parametrize("text", ['{"path": "a.png", "results": []}\ngarbage\n{"path": "b.png", "results": []}\n',
                                  "\x00\x00\xff\n", "# my notes\n"])  # fmt: skip
def test_an_output_file_that_is_not_predicts_is_left_alone(tmp_path: Path, text: str) -> None:
    """Only a last line cut short is an interrupted write; a whole line that is no result means the file
    is someone else's (or damaged): refused, the file as it was (it was cut at that line, and all after it)."""
    out = tmp_path / "out.jsonl"
    out.write_bytes(text.encode("latin-1"))
    with pytest.raises(PredictError, match="line"):
        done_paths(out)
    assert out.read_bytes() == text.encode("latin-1")


@pytest.mark.parametrize("where", ["a_folder", "missing/out.jsonl"])
def test_an_output_that_cannot_be_written_is_a_clear_error(tmp_path: Path, where: str) -> None:
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "images").mkdir()
    predictor: Any = SimpleNamespace(model=SimpleNamespace(name="m"))
    with pytest.raises(PredictError, match="cannot write"):
        predict(predictor, tmp_path / "images", tmp_path / where, 8)
