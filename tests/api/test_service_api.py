"""Health, model listing, docs, limits and fault isolation through the real app."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from service.manifest import MANIFEST_FILE
from service.settings import Settings
from tests.conftest import TINY_NAME, client_for, copy_repository
from tests.helpers import held_out_digits, png_bytes

DIGIT = png_bytes(held_out_digits()[0][0])


def test_health(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "live"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    models = {
        name: {"state": "ready", "reason": None, "versions": [1], "failed_versions": {}, "failed_graphs": {}}
        for name in ("detr", "imagetransformer", "vit")
    }
    assert ready.json() == {"ready": True, "draining": False, "reason": None, "models": models}


def test_models_lists_providers_and_quality(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert {name: m["task"] for name, m in models.items()} == {
        "detr": "detection",
        "imagetransformer": "generation",
        "vit": "classification",
    }
    for model in models.values():
        assert model["state"] == "ready" and model["providers"] == ["CPUExecutionProvider"]
        assert model["labels"] == [str(d) for d in range(10)]
    assert models["vit"]["input_size"] == [32, 32] and models["detr"]["input_size"] == [96, 96]
    # the figures the manifests report (recomputed from the artifacts in test_shipped_quality.py and the
    # e2e tests), just below their values: top1 0.986, mAP@.5 0.994, mAP 0.781, recognition 0.945
    assert models["vit"]["quality"]["top1"] >= 0.98
    assert models["detr"]["quality"]["map50_onnx"] >= 0.99 and models["detr"]["quality"]["map_onnx"] >= 0.77
    quality = models["imagetransformer"]["quality"]
    assert quality["bits_per_dim_onnx"] <= 0.8 * quality["baseline_bits_per_dim"]
    assert quality["vit_recognition_rate"] >= 0.94


def test_openapi_documents_every_input_form(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/classify"]["post"]
    assert set(operation["requestBody"]["content"]) == {"multipart/form-data", "image/*", "application/json"}
    assert {p["name"] for p in operation["parameters"]} == {"model", "version", "top_k"}


def test_unknown_route_is_a_json_404(client: TestClient) -> None:
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


@pytest.fixture()
def small_body_client() -> Iterator[TestClient]:
    yield from client_for(
        Settings(model_repository=Path("model_repository"), device="cpu", max_body_bytes=1000, warmup=False)
    )


def test_oversized_body_is_413_before_it_is_read(small_body_client: TestClient) -> None:
    response = small_body_client.post("/v1/classify", content=b"x" * 5000, headers={"content-type": "image/png"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: stopped while streaming
        yield from [b"x" * 600] * 5

    response = small_body_client.post("/v1/classify", content=chunks(), headers={"content-type": "image/png"})
    assert response.status_code == 413


@pytest.fixture()
def broken_repository(tiny_repository: Path, tmp_path: Path) -> Path:
    """One good model and five broken ones, each broken differently."""
    root = copy_repository(tiny_repository, tmp_path / "repo")
    good = root / TINY_NAME / "1"
    for name in ("corrupt", "mismatched", "no_manifest", "bad_manifest", "bad_attention"):
        shutil.copytree(good, root / name / "1")
        manifest = (
            (root / name / "1" / MANIFEST_FILE).read_text().replace(f'"name": "{TINY_NAME}"', f'"name": "{name}"')
        )
        (root / name / "1" / MANIFEST_FILE).write_text(manifest)
    (root / "corrupt" / "1" / "model.onnx").write_bytes(b"\x08\x01garbage")
    (root / "bad_attention" / "1" / "attention.onnx").write_bytes(b"\x08\x01garbage")
    mismatched = root / "mismatched" / "1" / MANIFEST_FILE
    mismatched.write_text(mismatched.read_text().replace('"pixel_values"', '"images"'))
    (root / "no_manifest" / "1" / MANIFEST_FILE).unlink()
    (root / "bad_manifest" / "1" / MANIFEST_FILE).write_text('{"name": "bad_manifest"}')
    return root


def test_a_broken_model_takes_down_only_itself(broken_repository: Path) -> None:
    for client in client_for(Settings(model_repository=broken_repository, device="cpu", lazy_attention=False)):
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        states = ready.json()["models"]
        assert states[TINY_NAME]["state"] == "ready"
        reasons = {name: s["reason"] for name, s in states.items() if s["state"] == "failed"}
        assert set(reasons) == {"corrupt", "mismatched", "no_manifest", "bad_manifest"}
        assert not any(str(broken_repository) in reason for reason in reasons.values())  # no absolute paths
        assert "bad_attention/1/attention.onnx" in str(reasons) + str(states["bad_attention"]["failed_graphs"])
        assert "images" in reasons["mismatched"] and "pixel_values" in reasons["mismatched"]
        assert "manifest.json" in reasons["no_manifest"]
        assert "ValidationError" in reasons["bad_manifest"]
        v2_ready = client.get("/v2/health/ready")  # KServe's body, Triton's status
        assert v2_ready.status_code == 503 and v2_ready.json() == {"ready": False}
        assert client.get(f"/v2/models/{TINY_NAME}/ready").json() == {"name": TINY_NAME, "ready": True}
        corrupt = client.get("/v2/models/corrupt/ready")
        assert corrupt.status_code == 503 and set(corrupt.json()) == {"error"}
        listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert listed["corrupt"]["reason"] == reasons["corrupt"] and listed["corrupt"]["providers"] == []

        response = client.post(f"/v1/classify?model={TINY_NAME}", content=DIGIT, headers={"content-type": "image/png"})
        assert response.status_code == 200
        # a broken optional graph takes down only the routes that need it
        assert states["bad_attention"]["state"] == "ready" and set(states["bad_attention"]["failed_graphs"]) == {
            "attention"
        }
        png = {"content": DIGIT, "headers": {"content-type": "image/png"}}
        assert client.post("/v1/classify?model=bad_attention", **png).status_code == 200
        refused = client.post("/v1/classify/attention?model=bad_attention", **png)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "graph_not_ready"
        response = client.post("/v1/classify?model=corrupt", content=DIGIT, headers={"content-type": "image/png"})
        assert response.status_code == 503 and "not ready" in response.json()["error"]["message"]


def test_an_attention_graph_loads_on_its_first_request(broken_repository: Path) -> None:
    """By default an attention graph (a second copy of the weights) loads when first asked for: a
    broken one then answers 503 with the reason, and readiness shows it from then on."""
    png = {"content": DIGIT, "headers": {"content-type": "image/png"}}
    for client in client_for(Settings(model_repository=broken_repository, device="cpu")):
        model = client.app.state.registry.named(TINY_NAME)  # type: ignore[attr-defined]
        assert set(model.sessions) == {"main"} and set(model.lazy) == {"attention"}
        assert client.get("/health/ready").json()["models"]["bad_attention"]["failed_graphs"] == {}
        answer = client.post(f"/v1/classify/attention?model={TINY_NAME}", **png)
        assert answer.status_code == 200 and set(model.sessions) == {"main", "attention"} and not model.lazy
        metrics = client.get("/metrics").text
        assert f'vitserve_batch_size_count{{graph="attention",model="{TINY_NAME}",version="1"}}' in metrics
        for _ in range(2):  # refused the same way each time, the reason kept
            refused = client.post("/v1/classify/attention?model=bad_attention", **png)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "graph_not_ready"
        failed = client.get("/health/ready").json()["models"]["bad_attention"]["failed_graphs"]
        assert "bad_attention/1/attention.onnx" in failed["attention"]
        assert client.post("/v1/classify?model=bad_attention", **png).status_code == 200


def test_a_missing_repository_says_so_in_readiness(tmp_path: Path) -> None:
    for client in client_for(Settings(model_repository=tmp_path / "nowhere", device="cpu")):
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and "'nowhere' does not exist" in ready.json()["reason"]
        assert str(tmp_path) not in ready.text


def test_server_timing_names_every_stage(client: TestClient) -> None:
    """Every answer, whether it ran in a batch or alone on the event loop (the first requests teach the
    batcher how long a run takes; the later lone ones skip its thread)."""
    for _ in range(5):
        response = client.post("/v1/classify", content=DIGIT, headers={"content-type": "image/png"})
        stages = dict(part.split(";dur=") for part in response.headers["server-timing"].split(", "))
        assert set(stages) == {"decode", "preprocess", "queue", "inference", "postprocess", "encode", "total"}
        assert all(float(ms) >= 0 for ms in stages.values())
        assert float(stages["total"]) >= float(stages["inference"])


def test_metrics_count_requests_stages_batches_and_rejections(client: TestClient) -> None:
    client.post("/v1/classify", content=DIGIT, headers={"content-type": "image/png"})
    client.post("/v1/classify", content=b"junk", headers={"content-type": "image/png"})
    text = client.get("/metrics").text
    assert 'vitserve_requests_total{model="vit",route="/v1/classify",status="200"}' in text
    assert 'vitserve_rejected_total{reason="unsupported_image"}' in text
    assert 'vitserve_stage_seconds_count{model="vit",provider="CPUExecutionProvider",stage="inference"}' in text
    assert 'vitserve_batch_size_count{graph="main",model="vit",version="1"}' in text
    assert 'vitserve_queue_images{graph="main",model="vit",version="1"} 0.0' in text
    assert 'vitserve_model_ready{model="detr",version="1"} 1.0' in text and "vitserve_model_load_seconds" in text


def test_request_ids_are_kept_or_made_and_reach_errors(client: TestClient) -> None:
    given = client.post(
        "/v1/classify", content=b"junk", headers={"content-type": "image/png", "x-request-id": "abc-123"}
    )
    assert given.headers["x-request-id"] == "abc-123"
    assert given.json()["error"]["request_id"] == "abc-123"
    made = client.get("/health/live", headers={"x-request-id": "bad id with spaces"})
    assert made.headers["x-request-id"] != "bad id with spaces" and len(made.headers["x-request-id"]) == 32


def test_one_json_log_line_per_request(caplog: pytest.LogCaptureFixture, client: TestClient) -> None:
    import json
    import logging

    from service.logs import JsonFormatter

    with caplog.at_level(logging.INFO, logger="service.access"):
        client.post("/v1/classify", content=DIGIT, headers={"content-type": "image/png", "x-request-id": "r-42"})
    (record,) = [r for r in caplog.records if r.name == "service.access"]
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "r-42" and line["status"] == 200 and line["model"] == "vit"
    assert line["path"] == "/v1/classify" and line["ms"] > 0


def test_paths_and_request_ids_cannot_forge_log_lines_or_headers(
    caplog: pytest.LogCaptureFixture, client: TestClient
) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="service.access"):
        client.get("/health/live%0a2026-01-01 INFO service.access: GET /admin 200")
        answered = client.get("/health/live", headers={"x-request-id": b"caf\xe9"})  # a word character in latin-1
    (forged, _) = [r.getMessage() for r in caplog.records if r.name == "service.access"]
    assert "\n" not in forged and "\\n2026" in forged
    assert answered.headers["x-request-id"].isascii() and len(answered.headers["x-request-id"]) == 32


@pytest.fixture()
def keyed_client() -> Iterator[TestClient]:
    yield from client_for(
        Settings(model_repository=Path("model_repository"), device="cpu", warmup=False, api_key="s3cret")
    )


@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_api_key_is_a_startup_error(key: str) -> None:
    """Set but empty (what a compose file passes for an unset variable) would guard nothing."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set but empty"):
        Settings(api_key=key)


def test_api_key_guards_inference_not_health(keyed_client: TestClient) -> None:
    headers = {"content-type": "image/png"}
    refused = keyed_client.post("/v1/classify", content=DIGIT, headers=headers)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert refused.json()["error"]["code"] == "unauthorized" and "s3cret" not in refused.text
    wrong = keyed_client.post("/v1/classify", content=DIGIT, headers={**headers, "authorization": "Bearer nope"})
    assert wrong.status_code == 401
    for auth in ({"authorization": "Bearer s3cret"}, {"x-api-key": "s3cret"}):
        assert keyed_client.post("/v1/classify", content=DIGIT, headers={**headers, **auth}).status_code == 200
    assert keyed_client.get("/v2/models/vit").status_code == 401
    for open_route in ("/health/live", "/health/ready", "/metrics", "/docs", "/v2/health/ready"):
        assert keyed_client.get(open_route).status_code == 200, open_route


def test_health_can_be_guarded_too() -> None:
    settings = Settings(model_repository=Path("model_repository"), warmup=False, api_key="k", auth_health=True)
    for client in client_for(settings):
        assert client.get("/health/ready").status_code == 401
        assert client.get("/metrics", headers={"x-api-key": "k"}).status_code == 200


def test_slow_answers_get_504_with_their_request_id() -> None:
    settings = Settings(model_repository=Path("model_repository"), warmup=False, request_timeout_s=0.000001)
    for client in client_for(settings):
        headers = {"content-type": "image/png", "x-request-id": "slow-1"}
        response = client.post("/v1/classify", content=DIGIT, headers=headers)
        assert response.status_code == 504
        assert response.json()["error"] | {"message": ""} == {"code": "timeout", "message": "", "request_id": "slow-1"}
        metrics = generate_latest(client.app.state.metrics.registry).decode()  # type: ignore[attr-defined]
        assert 'vitserve_rejected_total{reason="timeout"} 1.0' in metrics


def test_models_and_metrics_show_what_each_model_took_in_memory(client: TestClient) -> None:
    from service.memory import resident_bytes

    assert (resident_bytes() or 0) > 10 * 2**20  # this process: Python, numpy, ONNX Runtime at least
    models = client.get("/v1/models").json()["models"]
    assert all(isinstance(m["resident_bytes"], int) and m["resident_bytes"] >= 0 for m in models)
    metrics = client.get("/metrics").text
    assert all(f'vitserve_model_resident_bytes{{model="{m["name"]}",version="1"}}' in metrics for m in models)
