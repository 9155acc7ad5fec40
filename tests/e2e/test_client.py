"""vitserve.client (sync and async) and the `vitserve` command against a real uvicorn with an API key."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import PROJECT_ROOT
from tests.e2e.conftest import Server, free_port, running_server
from vitserve.client import (
    AsyncClient,
    Call,
    Classified,
    Client,
    Detected,
    EndpointMissing,
    Generated,
    Row,
    Unreachable,
    VitserveError,
)

KEY = "client-test-key"
DIGIT = PROJECT_ROOT / "examples" / "digit-7.png"
SCENE = PROJECT_ROOT / "examples" / "scene.png"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("keyed"), VITSERVE_API_KEY=KEY) as server:
        yield server


def test_sync_client(keyed: Server) -> None:
    with Client(keyed.url, api_key=KEY) as client:
        assert client.health().ready and client.health().models["vit"] == "ready"
        assert {m.name: m.task for m in client.models()}["detr"] == "detection"
        classified = client.classify([DIGIT, DIGIT.read_bytes()], top_k=2)
        assert isinstance(classified, Classified) and classified.results[0][0].label == "7"
        assert classified.results[0] == classified.results[1] and len(classified.results[0]) == 2
        detected = client.detect(SCENE, threshold=0.5)
        assert isinstance(detected, Detected) and detected.results[0] and detected.results[0][0].box.xmax > 0
        plain = client.generate(label="3", seed=5, scale=1)
        assert plain.images[0].startswith(b"\x89PNG") and plain.size == (8, 8)
        events = list(client.generate_stream(label="3", seed=5, scale=1))
        assert [e.row for e in events if isinstance(e, Row)] == list(range(8))
        assert events[-1] == plain  # the stream's answer is the plain route's, bit for bit


def test_sync_errors(keyed: Server) -> None:
    with Client(keyed.url, api_key=KEY) as client:
        with pytest.raises(VitserveError) as unknown:
            client.classify(DIGIT, model="nope")
        assert (unknown.value.status, unknown.value.code) == (404, "unknown_model") and "nope" in unknown.value.message
        with pytest.raises(VitserveError) as no_embedder:  # /v1/embed is there, but no embedding model
            client.embed(DIGIT)
        assert (no_embedder.value.status, no_embedder.value.code) == (404, "no_model")
        with pytest.raises(EndpointMissing):
            client.send(Call("POST", "/v1/nowhere", lambda body: body))
    with Client(keyed.url, api_key="wrong") as client, pytest.raises(VitserveError) as refused:
        client.classify(DIGIT)
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    with Client(f"http://127.0.0.1:{free_port()}") as client, pytest.raises(Unreachable):
        client.models()


def test_async_client(keyed: Server) -> None:
    async def calls() -> tuple[Classified, Detected, Generated, list[Row | Generated]]:
        async with AsyncClient(keyed.url, api_key=KEY) as client:
            assert (await client.health()).ready and (await client.models())
            with pytest.raises(VitserveError) as invalid:
                await client.classify(DIGIT, top_k=0)
            assert invalid.value.code == "invalid_request"
            classified, detected, plain = await asyncio.gather(
                client.classify(DIGIT), client.detect(SCENE), client.generate(label="3", seed=5, scale=1)
            )
            events = [event async for event in client.generate_stream(label="3", seed=5, scale=1)]
            return classified, detected, plain, events

    classified, detected, plain, events = asyncio.run(calls())
    with Client(keyed.url, api_key=KEY) as client:
        assert classified == client.classify(DIGIT) and detected == client.detect(SCENE)
    assert events[-1] == plain and sum(isinstance(e, Row) for e in events) == 8


def vitserve(*args: str, url: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VITSERVE_URL": url}
    env.pop("VITSERVE_API_KEY", None)
    env.update({"VITSERVE_API_KEY": key} if key else {})
    return subprocess.run([sys.executable, "-m", "vitserve", *args], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_command_line(keyed: Server, tmp_path: Path) -> None:
    table = vitserve("classify", str(DIGIT), "--top-k", "2", url=keyed.url)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["image", "label", "score"] and " 7 " in table.stdout
    answer = json.loads(vitserve("detect", str(SCENE), "--json", url=keyed.url).stdout)
    assert answer["model"] == "detr" and answer["results"][0][0]["box"]["xmax"] > 0
    made = vitserve("generate", "--label", "3", "--seed", "5", "--num-images", "2", "--stream", "--out",
                    str(tmp_path / "png"), "--json", url=keyed.url)  # fmt: skip
    assert made.returncode == 0, made.stderr
    files = json.loads(made.stdout)["files"]
    assert len(files) == 2 and all(Path(f).read_bytes().startswith(b"\x89PNG") for f in files)
    assert "8/8" in made.stderr  # the progress bar counted every row
    missing = vitserve("embed", str(DIGIT), url=keyed.url)
    assert missing.returncode == 1 and "no embedding model" in missing.stderr and "Traceback" not in missing.stderr
    refused = vitserve("models", url=keyed.url, key=None)
    assert refused.returncode == 1 and "unauthorized" in refused.stderr and "Traceback" not in refused.stderr
