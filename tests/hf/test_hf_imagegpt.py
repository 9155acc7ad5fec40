"""ImageGPT imported by `python -m export.hf` and served as a generation model by a real `python -m service`
(the cache on the host) and through the app (the cache in the device pool), compared with transformers:
greedy tokens against `generate(do_sample=False)`, scores against its loss, attention against its own,
images drawn in the palette's colours, on the page too."""

from __future__ import annotations

import base64
import io
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from playwright.sync_api import Browser, expect

from service.settings import PROJECT_ROOT, Settings
from tests.conftest import client_for
from tests.e2e.conftest import running_server
from tests.e2e.test_page import BROKEN, browser  # noqa: F401  (browser: the fixture)
from tests.hf import checkpoints
from tests.hf.photos import decoded, photos

pytest.importorskip("transformers")

NAME, SIDE, PRIME_ROWS = "hfimagegpt", 8, 3
JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.imagegpt(tmp_path_factory.mktemp("imagegpt") / "checkpoint")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, folder: Path) -> Path:
    """Imported by the real command line, which prints what it published."""
    repository = tmp_path_factory.mktemp("imagegpt_repository")
    command = [sys.executable, "-m", "export.hf", str(folder), "--name", NAME, "--repository", str(repository)]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["architecture"] == "ImageGPTForCausalImageModeling"
    return repository


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, repository: Path) -> Iterator[str]:
    with running_server(tmp_path_factory.mktemp("imagegpt_server"), VITSERVE_MODEL_REPOSITORY=str(repository)) as s:
        yield s.url


@pytest.fixture(scope="module")
def pooled_client(repository: Path) -> Iterator[TestClient]:
    """The app with the generation caches in the pooled step graph's device-side pool."""
    yield from client_for(Settings(model_repository=repository, device="cpu", device_cache="on"))


@pytest.fixture(scope="module")
def hf(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoImageProcessor, ImageGPTForCausalImageModeling

    model = ImageGPTForCausalImageModeling.from_pretrained(folder, attn_implementation="eager").eval()
    return model, AutoImageProcessor.from_pretrained(folder, local_files_only=True)


def colours(processor: Any, tokens: np.ndarray) -> np.ndarray:
    """What the service must draw for `tokens`: each cluster's colour, round((c + 1) * 127.5)."""
    palette = np.clip(np.round((np.asarray(processor.clusters, dtype=np.float64) + 1) * 127.5), 0, 255)
    return palette.astype(np.uint8)[tokens]


def photo_tokens(processor: Any, data: bytes) -> np.ndarray:
    return np.asarray(processor(images=decoded(data), return_tensors="np")["input_ids"])[0]


def greedy(model: Any, prime: np.ndarray) -> np.ndarray:
    """transformers' greedy decoding from SOS + `prime` -> the `[side, side]` tokens."""
    import torch

    sos = model.config.vocab_size - 1
    context = torch.tensor([[sos, *prime]])
    with torch.no_grad():
        out = model.generate(input_ids=context, attention_mask=torch.ones_like(context), do_sample=False,
                             max_length=SIDE * SIDE + 1, pad_token_id=sos)  # fmt: skip
    return out[0, 1:].numpy().reshape(SIDE, SIDE)


def pngs(body: dict[str, Any]) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(p)))) for p in body["images"]]


def generate(url_or_client: str | TestClient, **request: Any) -> dict[str, Any]:
    body = {"model": NAME, "scale": 1, **request}
    if isinstance(url_or_client, TestClient):
        response = url_or_client.post("/v1/generate", json=body)
    else:
        response = httpx2.post(f"{url_or_client}/v1/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_the_manifest_records_the_gates(repository: Path) -> None:
    from service.manifest import GenerationConfig, read_manifest

    manifest = read_manifest(repository / NAME / "1")
    cfg = GenerationConfig.model_validate(manifest.config)
    assert (manifest.task, manifest.labels, cfg.levels, cfg.num_classes, len(cfg.palette or [])) == (
        "generation", [], 16, 0, 16
    )  # fmt: skip
    assert {"main", "attention", "step", "pooled_step"} <= set(manifest.graphs)
    assert manifest.quality["greedy_token_agreement"] == 1.0 and manifest.quality["score_max_abs_diff_bits"] <= 1e-4
    assert manifest.parity.max_abs_diff <= manifest.parity.tolerance


def test_greedy_unconditional_equals_transformers(server: str, pooled_client: TestClient, hf: tuple[Any, Any]) -> None:
    model, processor = hf
    expected = colours(processor, greedy(model, np.zeros(0, dtype=np.int64)))
    for where in (server, pooled_client):
        images = pngs(generate(where, top_k=1, num_images=2, seed=3))
        for image in images:
            np.testing.assert_array_equal(image, expected)  # the tokens' palette colours, RGB


def test_greedy_primed_equals_transformers(server: str, pooled_client: TestClient, hf: tuple[Any, Any]) -> None:
    """The prime quantized as the image processor does, its top rows kept, the rest decoded greedily."""
    model, processor = hf
    for name in ("china.jpeg", "portrait.png"):
        data = photos()[name]
        expected = colours(processor, greedy(model, photo_tokens(processor, data)[: PRIME_ROWS * SIDE]))
        prime = base64.b64encode(data).decode()
        for where in (server, pooled_client):
            (image,) = pngs(generate(where, top_k=1, prime=prime, prime_rows=PRIME_ROWS, seed=1))
            np.testing.assert_array_equal(image, expected)


def test_seeded_sampling_is_the_same_alone_and_batched(server: str) -> None:
    """Same seed, same images: run twice alone, and with other requests sharing the steps."""
    requests = [{"num_images": n, "seed": seed, "temperature": 1.0} for n, seed in ((3, 7), (1, 8), (2, 9), (4, 10))]
    alone = [generate(server, **r)["images"] for r in requests]
    assert generate(server, **requests[0])["images"] == alone[0]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: generate(server, **r)["images"], requests * 2))
    assert together == alone * 2
    assert len(set(alone[0])) > 1  # sampled, not all alike


def test_scores_equal_transformers_loss(server: str, hf: tuple[Any, Any]) -> None:
    """Bits per dimension: transformers' loss over SOS + every pixel (the tiny model's n_positions has
    room for it), in bits, within 1e-4."""
    import torch

    model, processor = hf
    names = ["china.jpeg", "flower.png", "wide.jpeg"]
    files = [("file", (name, photos()[name], "image/*")) for name in names]
    response = httpx2.post(f"{server}/v1/score?model={NAME}", files=files, timeout=60)
    assert response.status_code == 200, response.text
    for name, result in zip(names, response.json()["results"], strict=True):
        sequence = torch.tensor([[model.config.vocab_size - 1, *photo_tokens(processor, photos()[name])]])
        with torch.no_grad():
            loss = float(model(input_ids=sequence, labels=sequence).loss)
        assert abs(result["bits_per_dim"] - loss / math.log(2)) <= 1e-4


def test_pixel_attention_is_transformers_attention(server: str, hf: tuple[Any, Any]) -> None:
    """The last layer's mean over heads for pixel (row, col): position 0 is SOS, position s reads pixel s - 1."""
    import torch

    model, processor = hf
    data = photos()["flower.jpeg"]
    row, col = 5, 2
    body = {"image": base64.b64encode(data).decode(), "row": row, "col": col, "model": NAME}
    answer = httpx2.post(f"{server}/v1/generate/attention", json=body, timeout=60).json()
    tokens = photo_tokens(processor, data)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[model.config.vocab_size - 1, *tokens[:-1]]]), output_attentions=True)
    t = row * SIDE + col
    weights = out.attentions[-1][0].mean(0)[t].numpy()
    assert answer["start"] == pytest.approx(float(weights[0]), abs=1e-5)
    np.testing.assert_allclose(np.ravel(answer["map"])[:t], weights[1 : t + 1], atol=1e-5)
    assert answer["context"] == t


def test_v2_raw_graph_gives_the_log_likelihood(server: str, hf: tuple[Any, Any]) -> None:
    _, processor = hf
    tokens = photo_tokens(processor, photos()["china.png"])
    body = {"inputs": [{"name": "pixels", "datatype": "INT64", "shape": [1, tokens.size], "data": tokens.tolist()}]}
    response = httpx2.post(f"{server}/v2/models/{NAME}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    score = httpx2.post(
        f"{server}/v1/score?model={NAME}",
        content=photos()["china.png"],
        headers={"content-type": "image/png"},
        timeout=60,
    ).json()
    ll = outputs["log_likelihood"]["data"][0]
    assert score["results"][0]["log_likelihood"] == pytest.approx(ll, rel=1e-6)


def test_streamed_rows_are_palette_colours(pooled_client: TestClient) -> None:
    with pooled_client.stream("POST", "/v1/generate", json={"model": NAME, "num_images": 2, "seed": 4, "stream": True,
                                                            "scale": 1}) as response:  # fmt: skip
        assert response.status_code == 200
        events = [block for block in response.read().decode().split("\n\n") if block]
    rows = [json.loads(block.split("data: ", 1)[1]) for block in events[:-1]]
    images = pngs(json.loads(events[-1].split("data: ", 1)[1]))
    assert [r["row"] for r in rows] == list(range(SIDE))
    for r in rows:
        assert np.array_equal(np.asarray(r["pixels"]), np.stack([image[r["row"]] for image in images]))  # RGB


def test_an_unconditional_model_refuses_a_label(pooled_client: TestClient) -> None:
    response = pooled_client.post("/v1/generate", json={"model": NAME, "label": "3"})
    assert response.status_code == 422 and "unconditional" in response.json()["error"]["message"]


def test_clusters_that_do_not_fit_the_vocabulary_are_refused(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from export import hf

    broken = shutil.copytree(folder, tmp_path / "broken")
    config = json.loads((broken / "preprocessor_config.json").read_text())
    config["clusters"] = config["clusters"][:-1]
    (broken / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        hf.main([str(broken), "--name", "x", "--repository", str(tmp_path / "repository")])
    assert "15 clusters for a vocabulary of 17" in capsys.readouterr().err
    assert not (tmp_path / "repository").exists()


def test_the_page_draws_it_in_the_palette_colours(browser: Browser, server: str) -> None:  # noqa: F811
    page = browser.new_page(viewport={"width": 1100, "height": 1400})
    page.goto(server + "/")
    expect(page.locator("#generator option")).to_have_text([f"{NAME} (ImageGPTForCausalImageModeling)"])
    expect(page.locator("#digit-field")).to_be_hidden()  # unconditional: no label sent (it would be a 422)
    assert page.locator("#image-section").is_hidden()  # no classifier or detector served
    page.fill("#seed", "7")
    page.click("#generate")
    expect(page.locator("#canvas")).to_have_attribute("data-done", "true", timeout=30_000)
    expect(page.locator("#gen-status")).to_have_text("Done: (seed 7).")
    answer = httpx2.post(f"{server}/v1/generate", json={"model": NAME, "seed": 7, "scale": 1}, timeout=60).json()
    expected = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB"))
    drawn = page.evaluate("""() => { const c = document.getElementById('canvas'), cell = c.width / 8;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, rows = [];
        for (let y = 0; y < 8; y++) { const row = []; rows.push(row);
          for (let x = 0; x < 8; x++) { const i = 4 * ((y * cell + cell / 2) * c.width + x * cell + cell / 2);
                                        row.push([d[i], d[i + 1], d[i + 2]]); } }
        return rows; }""")
    assert (np.asarray(drawn) == expected).all()  # each pixel its palette colour, as the PNG has it
    assert page.evaluate(BROKEN) == []
    page.close()


def test_parity_an_image_at_a_time_is_as_strict(repository: Path, hf: tuple[Any, Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """At real size the attention parity runs an image at a time (ImageGPT-small's attention is 805 MB
    an image); the tiny model's fits at once. Both ways, every output is measured, to the same figures."""
    import onnxruntime as ort

    from export import hf_imagegpt
    from export.onnx_export import images_within
    from service.manifest import GenerationConfig, read_manifest

    model, processor = hf
    manifest = read_manifest(repository / NAME / "1")
    cfg = GenerationConfig.model_validate(manifest.config)
    small = GenerationConfig.model_validate({**manifest.config, "height": 32, "width": 32, "memory": 1024,
                                             "layers": 24, "heads": 8, "dim": 512})  # fmt: skip
    fit = [images_within(hf_imagegpt.graphs(c)["attention"], hf_imagegpt.ATTENTION_BYTES) for c in (small, cfg)]
    assert fit[0] == 1 and fit[1] >= hf_imagegpt.PARITY_BATCH
    sessions = {g: ort.InferenceSession(str(repository / NAME / "1" / manifest.graphs[g].file))
                for g in ("main", "attention", "step")}  # fmt: skip
    pixels = hf_imagegpt.photo_tokens(processor, manifest.preprocessing, cfg)[0][: hf_imagegpt.PARITY_BATCH]
    at_once = hf_imagegpt.graph_parity(model, cfg, sessions, pixels)
    monkeypatch.setattr(hf_imagegpt, "ATTENTION_BYTES", 1)  # an image at a time
    apart = hf_imagegpt.graph_parity(model, cfg, sessions, pixels)
    names = ["main.logits", "step.logits", "attention.logits", "attention.attention"]
    assert [o.name for o in apart.outputs] == [o.name for o in at_once.outputs] == names
    for a, b in zip(apart.outputs, at_once.outputs, strict=True):
        assert a.tolerance == b.tolerance and a.max_abs_diff <= a.tolerance and b.max_abs_diff <= b.tolerance
    assert apart.argmax_equal and at_once.argmax_equal and apart.batch_size == at_once.batch_size == len(pixels)
