"""`vitserve predict` over 1,000 digit PNGs in nested folders: interrupted mid-run, resumed with the
same command, every image once, the answers those of the service's /v1/classify; detection with COCO
results; the entry point in pyproject resolves."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.settings import PROJECT_ROOT
from tests.conftest import SHIPPED_REPOSITORY
from tests.helpers import ctrl_c_reaches_it

IMAGES = 1000


def digit_folder(root: Path) -> Path:
    """1,000 of scikit-learn's digits as 32x32 PNGs under root/d<label>/part<n>/, a text file and a
    file that is no image."""
    digits = pytest.importorskip("sklearn.datasets").load_digits()
    for i in range(IMAGES):
        path = root / f"d{digits.target[i]}" / f"part{i % 3}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grey = (digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(grey, "L").resize((32, 32), Image.Resampling.NEAREST).save(path)
    (root / "README.txt").write_text("not an image: skipped")
    (root / "d0" / "broken.png").write_bytes(b"not a PNG")  # an image by name: an error line
    return root


def predict(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vitserve", "predict", *args], cwd=PROJECT_ROOT, text=True,
                            env={**os.environ, "VITSERVE_DEVICE": "cpu"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=ctrl_c_reaches_it)  # fmt: skip


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def flat(answer: object) -> list[object]:
    if isinstance(answer, dict):
        return [x for key in sorted(answer) for x in [key, *flat(answer[key])]]
    return [x for item in answer for x in flat(item)] if isinstance(answer, list) else [answer]


def same(ours: object, served: object) -> bool:
    """The same labels and the same numbers, to the last bits a batch of another size may change in
    ONNX Runtime's kernels."""
    a, b = flat(ours), flat(served)
    return len(a) == len(b) and all(x == pytest.approx(y, rel=1e-6, abs=1e-9) if isinstance(x, float) else x == y
                                    for x, y in zip(a, b, strict=True))  # fmt: skip


def test_predict_is_resumable_and_answers_as_the_service(tmp_path: Path, client: TestClient) -> None:
    folder, out = digit_folder(tmp_path / "digits"), tmp_path / "results.jsonl"
    first = predict("vit", str(folder), "--out", str(out), "--batch-size", "4")
    while lines_in(out) < 100 and first.poll() is None:
        time.sleep(0.005)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=30)
    written = lines_in(out)
    assert first.returncode == 130 and "run the same command again" in stderr, stderr
    assert 100 <= written < IMAGES, "the run finished before it could be interrupted"
    with out.open("a") as sink:  # as a kill in the middle of a write leaves it
        sink.write('{"path": "d1/part0/00')
    second = predict("vit", str(folder), "--out", str(out), "--batch-size", "64")
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr
    assert "dropped" in stderr and f"{written} before" in stderr and "1 files under" in stderr

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    paths = [row["path"] for row in rows]
    expected = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert sorted(paths) == expected and len(paths) == len(set(paths)) == IMAGES + 1  # each exactly once
    answers = {row["path"]: row for row in rows}
    assert answers["d0/broken.png"]["error"]["code"] == "unsupported_image"
    for path in expected[:: len(expected) // 25]:  # a sample, through the service's route
        if "error" in answers[path]:
            continue
        served = client.post("/v1/classify?model=vit", content=(folder / path).read_bytes(),
                             headers={"Content-Type": "image/png"})  # fmt: skip
        assert served.status_code == 200
        assert same(answers[path]["results"], served.json()["results"][0])


def test_predict_detection_writes_coco_results(tmp_path: Path, client: TestClient) -> None:
    folder = tmp_path / "scenes"
    folder.mkdir()
    scene = (PROJECT_ROOT / "examples" / "scene.png").read_bytes()
    for name in ("a.png", "b/c.png"):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(scene)
    out, coco = tmp_path / "found.jsonl", tmp_path / "coco.json"
    run = predict("detr", str(folder), "--out", str(out), "--coco", str(coco), "--threshold", "0.3")
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    rows = {row["path"]: row["results"] for row in map(json.loads, out.read_text().splitlines())}
    served = client.post("/v1/detect?model=detr&threshold=0.3", content=scene, headers={"Content-Type": "image/png"})
    assert rows["a.png"] == rows["b/c.png"] and same(rows["a.png"], served.json()["results"][0])
    results = json.loads(coco.read_text())
    labels = json.loads((SHIPPED_REPOSITORY / "detr" / "1" / "manifest.json").read_text())["labels"]
    assert {r["image_id"] for r in results} == {1, 2}  # b/c.png sorts after a.png
    first = rows["a.png"][0]
    assert results[0]["category_id"] == labels.index(first["label"]) + 1
    assert results[0]["bbox"][2] == pytest.approx(first["box"]["xmax"] - first["box"]["xmin"])


def test_console_script_resolves() -> None:
    """pyproject's [project.scripts] names a function that exists (without repointing any install)."""
    scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["vitserve"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
