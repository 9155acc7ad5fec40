"""`serve run deploy/ray/serve.yaml` on a local Ray: two replicas both answer, every route answers
as the plain service does, and a replica killed outright costs no request that follows."""

from __future__ import annotations

import base64
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import PROJECT_ROOT, Settings
from tests.e2e.conftest import free_port
from tests.helpers import ctrl_c_reaches_it, triton_images

SERVE_YAML = PROJECT_ROOT / "deploy" / "ray" / "serve.yaml"
EXAMPLES = PROJECT_ROOT / "examples"
DIGITS = [(EXAMPLES / name).read_bytes() for name in ("digit-7.png", "digit-3.png")]
SCENE = (EXAMPLES / "scene.png").read_bytes()
REPLICA = "x-vitserve-replica"


def config_for_test(tmp_path: Path, port: int) -> Path:
    """The shipped serve.yaml with only the address changed, and half a CPU per replica so two fit
    on a one-core runner."""
    config = yaml.safe_load(SERVE_YAML.read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    (deployment,) = config["applications"][0]["deployments"]
    deployment["ray_actor_options"]["num_cpus"] = 0.5
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_config_is_ray_serves() -> None:
    """Ray's own schema for serve.yaml, and its import path names an application: a quick failure
    before the slow ones below."""
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    (application,) = config.applications
    module, _, name = application.import_path.partition(":")
    assert isinstance(getattr(importlib.import_module(module), name), Application)


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Ray CLI serving the application on a new local Ray instance; Ctrl-C (SIGINT) at the end
    shuts Serve and that instance down."""
    folder = tmp_path_factory.mktemp("ray")
    port = free_port()
    log_path = folder / "serve.log"
    serve = str(Path(sys.executable).parent / "serve")
    if not Path(serve).exists():  # not skipped: CI installs the extra (make test)
        pytest.fail("Ray Serve's CLI is missing: pip install -e '.[cpu,ray]'")
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [serve, "run", "--address", "local", str(config_for_test(folder, port))],
            cwd=PROJECT_ROOT,  # `serve run` puts it on the path: deploy.ray.app imports from there
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=ctrl_c_reaches_it,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while not _ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve run did not become ready:\n{log_path.read_text()[-5000:]}")
            time.sleep(1)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:  # Serve stops its replicas one by one, gracefully
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            stacks = _stacks(process.pid)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"serve run did not stop on SIGINT within 90 s:\n{log_path.read_text()[-2000:]}\n{stacks}")


def _stacks(group: int) -> str:
    """Where each process of the group waits (py-spy), for the known issue above."""
    spy = Path(sys.executable).parent / "py-spy"
    found = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split()
    dumps = []
    for pid in found:
        done = subprocess.run([str(spy), "dump", "--pid", pid], capture_output=True, text=True, timeout=30)
        dumps.append(f"== {pid}\n{done.stdout[-3000:]}{done.stderr[-500:]}")
    return "\n".join(dumps)


def _ready(url: str) -> bool:
    try:
        return httpx2.get(f"{url}/health/ready", timeout=5).status_code == 200
    except httpx2.TransportError:
        return False


@pytest.fixture(scope="module")
def plain() -> Iterator[TestClient]:
    """The service as `python -m service` runs it: one process, one ONNX Runtime thread as a
    replica with one CPU or less has."""
    with TestClient(create_app(Settings(device="cpu", intra_op_threads=1))) as client:
        yield client


def classify(url: str, png: bytes) -> httpx2.Response:
    return httpx2.post(f"{url}/v1/classify", content=png, headers={"content-type": "image/png"}, timeout=30)


# one request at a time, so each runs as a batch of one on either side: the same floats, bit for bit
REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/", {}),
    ("GET", "/health/ready", {}),
    ("GET", "/v2", {}),
    ("GET", "/v2/models/vit", {}),
    ("POST", "/v1/classify", {"content": DIGITS[0], "headers": {"content-type": "image/png"}}),
    ("POST", "/v1/classify", {"files": [("file", DIGITS[0]), ("file", DIGITS[1])], "data": {"top_k": "3"}}),
    ("POST", "/v1/classify", {"json": {"images": [base64.b64encode(d).decode() for d in DIGITS]}}),
    ("POST", "/v1/detect", {"content": SCENE, "headers": {"content-type": "image/png"}}),
    ("POST", "/v1/classify/attention", {"content": DIGITS[1], "headers": {"content-type": "image/png"}}),
    ("POST", "/v1/generate", {"json": {"label": "7", "num_images": 2, "seed": 1}}),
    ("POST", "/v1/generate", {"json": {"label": "3", "seed": 2, "stream": True}}),
    ("POST", "/v2/models/vit_image/infer", triton_images(DIGITS)),
    ("POST", "/v1/classify", {"content": b"not an image", "headers": {"content-type": "image/png"}}),
]


@pytest.mark.parametrize(("method", "route", "request_"), REQUESTS, ids=[f"{m} {r}" for m, r, _ in REQUESTS])
def test_answers_as_the_plain_service(
    ray_serve: str, plain: TestClient, method: str, route: str, request_: dict[str, Any]
) -> None:
    ours = httpx2.request(method, f"{ray_serve}{route}", timeout=60, **request_)
    theirs = plain.request(method, route, **request_)
    assert ours.status_code == theirs.status_code
    assert ours.headers["content-type"] == theirs.headers["content-type"]
    assert REPLICA in ours.headers
    if ours.headers["content-type"].startswith("application/json"):
        ours_body, theirs_body = ours.json(), theirs.json()
        if "error" in ours_body:  # the request id differs, the rest must not
            ours_body["error"].pop("request_id"), theirs_body["error"].pop("request_id")
        assert ours_body == theirs_body
    else:
        assert ours.content == theirs.content


def test_models_are_the_plain_services(ray_serve: str, plain: TestClient) -> None:
    def steady(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Less what each process measured itself, and the graphs loaded on a first request (attention)."""
        measured = {"load_seconds", "batch_sizes", "resident_bytes", "max_batch_size"}
        return [{k: v for k, v in m.items() if k not in measured} for m in models]

    ours = httpx2.get(f"{ray_serve}/v1/models", timeout=30).json()["models"]
    assert steady(ours) == steady(plain.get("/v1/models").json()["models"])


def test_two_replicas_answer(ray_serve: str) -> None:
    seen = set()
    for _ in range(60):
        response = classify(ray_serve, DIGITS[0])
        assert response.status_code == 200
        seen.add(response.headers[REPLICA])
        if len(seen) == 2:
            break
    assert len(seen) == 2, f"only {seen} answered"


def test_a_killed_replica_fails_no_request_that_follows(ray_serve: str) -> None:
    """SIGKILL, as a crash or the OOM killer would: no drain, no goodbye to Ray."""
    replica, pid = classify(ray_serve, DIGITS[0]).headers[REPLICA].split()
    os.kill(int(pid), signal.SIGKILL)
    answered_by = set()
    for _ in range(20):
        response = classify(ray_serve, DIGITS[0])
        assert response.status_code == 200, response.text
        assert response.json()["results"][0][0]["label"] == "7"
        answered_by.add(response.headers[REPLICA].split()[0])
    # Ray starts another in its place: two replicas answer again, the dead one never
    deadline = time.monotonic() + 120
    while len(answered_by - {replica}) < 2 and time.monotonic() < deadline:
        response = classify(ray_serve, DIGITS[0])
        assert response.status_code == 200, response.text
        answered_by.add(response.headers[REPLICA].split()[0])
        time.sleep(0.2)
    assert replica not in answered_by
    assert len(answered_by) == 2, f"no replacement replica answered: {answered_by}"
