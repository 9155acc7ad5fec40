"""Model lifecycle through the real app: version policies, versions named by requests, Triton's
repository API (index, load, unload) in each model control mode, a broken version refused while the
one before serves, poll mode, the control key."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.errors import ServiceError
from service.manifest import MANIFEST_FILE, Latest, Specific, VersionPolicy
from service.repository import ServedModel, fingerprint, version_dirs
from service.settings import Settings
from tests.conftest import TINY_NAME, client_for, copy_repository
from tests.helpers import held_out_digits, png_bytes

HEADER_LENGTH = b"inference-header-content-length"  # Triton's binary tensor data
PNG = {"content": png_bytes(held_out_digits()[0][0]), "headers": {"content-type": "image/png"}}


def add_version(model_dir: Path, version: int, source: int = 1) -> Path:
    """A copy of version `source` as `version` (its manifest saying so), written beside and renamed in."""
    staged = model_dir / f".{version}.incoming"
    copy_repository(model_dir / str(source), staged)
    manifest = json.loads((staged / MANIFEST_FILE).read_text())
    (staged / MANIFEST_FILE).write_text(json.dumps({**manifest, "version": version}))
    return staged.rename(model_dir / str(version))


@pytest.fixture()
def repository(tiny_repository: Path, tmp_path: Path) -> Path:
    return copy_repository(tiny_repository, tmp_path / "repo")


@contextmanager
def serve(repository: Path, **settings: object) -> Iterator[TestClient]:
    yield from client_for(Settings(model_repository=repository, device="cpu", **settings))  # type: ignore[arg-type]


def classify(client: TestClient, query: str = "") -> tuple[int, str | None]:
    response = client.post(f"/v1/classify?model={TINY_NAME}{query}", **PNG)
    return response.status_code, response.headers.get("x-model-version")


def test_version_policies_pick_what_serves() -> None:
    present = [1, 3, 2]
    assert VersionPolicy().select(present) == [3]
    assert VersionPolicy(latest=Latest(num_versions=2)).select(present) == [3, 2]
    assert VersionPolicy(all={}).select(present) == [3, 2, 1]
    assert VersionPolicy(specific=Specific(versions=[1, 7])).select(present) == [1]
    with pytest.raises(ValueError, match="one of"):
        VersionPolicy(all={}, latest=Latest())


def test_two_versions_side_by_side_each_named_by_requests(repository: Path) -> None:
    model_dir = repository / TINY_NAME
    add_version(model_dir, 2)
    (model_dir / "config.json").write_text('{"version_policy": {"latest": {"num_versions": 2}}}')
    with serve(repository) as client:
        assert classify(client) == (200, "2")  # the highest, by default
        assert classify(client, "&version=1") == (200, "1")
        assert classify(client, "&version=3")[0] == 404
        listed = [(m["version"], m["default"]) for m in client.get("/v1/models").json()["models"]]
        assert listed == [(1, False), (2, True)]
        assert client.get(f"/v2/models/{TINY_NAME}").json()["versions"] == ["2", "1"]
        for version in ("1", "2"):
            assert client.get(f"/v2/models/{TINY_NAME}/versions/{version}/ready").status_code == 200
        assert client.get(f"/v2/models/{TINY_NAME}/versions/3/ready").status_code == 404
        assert client.get(f"/v2/models/{TINY_NAME}/versions/x1/ready").status_code == 404
        assert client.get("/health/ready").json()["models"][TINY_NAME]["versions"] == [2, 1]
        metrics = client.get("/metrics").text
        assert all(f'vitserve_model_ready{{model="{TINY_NAME}",version="{v}"}} 1.0' in metrics for v in (1, 2))


def test_the_v2_infer_route_of_a_version_answers_with_that_version(repository: Path) -> None:
    add_version(repository / TINY_NAME, 2)
    (repository / TINY_NAME / "config.json").write_text('{"version_policy": {"all": {}}}')
    with serve(repository) as client:
        manifest = client.get(f"/v2/models/{TINY_NAME}").json()
        spec = manifest["inputs"][0]
        shape = [1, *spec["shape"][1:]]
        tensor = {"name": spec["name"], "datatype": "FP32", "shape": shape, "data": [0.0] * math.prod(shape)}
        body = {"inputs": [tensor]}
        for version in ("1", "2"):
            answer = client.post(f"/v2/models/{TINY_NAME}/versions/{version}/infer", json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model_version"] == version


def test_load_and_unload_are_refused_unless_explicit(repository: Path) -> None:
    with serve(repository) as client:
        for action in ("load", "unload"):
            refused = client.post(f"/v2/repository/models/{TINY_NAME}/{action}")
            assert refused.status_code == 400 and "explicit" in refused.json()["error"]
        index = client.post("/v2/repository/index").json()
        assert {"name": TINY_NAME, "version": "1", "state": "READY", "reason": ""} in index


def test_explicit_mode_loads_reloads_refuses_and_unloads(repository: Path) -> None:
    model_dir = repository / TINY_NAME
    with serve(repository, model_control_mode="explicit") as client:
        assert classify(client) == (200, "1")
        add_version(model_dir, 2)
        assert classify(client) == (200, "1")  # nothing changes until asked
        assert client.post(f"/v2/repository/models/{TINY_NAME}/load", content=b"").status_code == 200
        assert classify(client) == (200, "2")
        assert classify(client, "&version=1")[0] == 404  # latest 1: version 1 went out
        registry = client.app.state.registry  # type: ignore[attr-defined]

        (model_dir / "3").mkdir()  # a broken version: refused with the reason, version 2 serves on
        (model_dir / "3" / MANIFEST_FILE).write_text('{"name": "broken"}')
        refused = client.post(f"/v2/repository/models/{TINY_NAME}/load", content=b"{}")
        assert refused.status_code == 400
        assert "version 3" in refused.json()["error"] and "version 2 serves on" in refused.json()["error"]
        assert classify(client) == (200, "2")
        index = {(row["version"], row["state"]): row["reason"] for row in client.post("/v2/repository/index").json()
                 if row["name"] == TINY_NAME}  # fmt: skip
        assert ("2", "READY") in index and "ValidationError" in index[("3", "UNAVAILABLE")]
        ready = client.get("/health/ready")
        assert ready.status_code == 200 and "3" in ready.json()["models"][TINY_NAME]["failed_versions"]
        ready_only = client.post("/v2/repository/index", json={"ready": True}).json()
        assert all(row["state"] == "READY" for row in ready_only)

        assert client.post(f"/v2/repository/models/{TINY_NAME}/unload").status_code == 200
        assert classify(client)[0] == 404
        assert not registry.unloading
        index_rows = [row for row in client.post("/v2/repository/index").json() if row["name"] == TINY_NAME]
        assert index_rows == [{"name": TINY_NAME, "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}]
        assert client.get("/health/ready").status_code == 200  # nothing left, as Triton: ready for the next load
        assert client.post("/v2/repository/index", json={"ready": "false"}).status_code == 400
        assert 'model="tiny' not in client.get("/metrics").text.split("vitserve_model_ready")[-1].split("\n#")[0]

        config = json.dumps({"version_policy": {"specific": {"versions": [1]}}})
        loaded = client.post(f"/v2/repository/models/{TINY_NAME}/load", json={"parameters": {"config": config}})
        assert loaded.status_code == 200, loaded.text
        assert classify(client) == (200, "1")  # rolled back by the load's own version policy


@pytest.mark.parametrize(
    ("name", "body", "message"),
    [
        (".hidden", b"", "no folder"),
        ("nowhere", b"", "no folder"),
        (TINY_NAME, b"[1]", "JSON object"),
        (TINY_NAME, b"{", "not JSON"),
        (TINY_NAME, b'{"parameters": {"file:1/model.onnx": "AAAA"}}', "not taken"),
        (TINY_NAME, b'{"parameters": {"config": "{\\"max_batch_size\\": 8}"}}', "version_policy"),
    ],
)
def test_a_bad_load_is_a_clear_400(repository: Path, name: str, body: bytes, message: str) -> None:
    with serve(repository, model_control_mode="explicit") as client:
        refused = client.post(f"/v2/repository/models/{name}/load", content=body)
        assert refused.status_code in (400, 404) and message in refused.json()["error"], refused.text
        assert classify(client) == (200, "1")


def test_a_load_never_leaves_the_repository(repository: Path) -> None:
    with serve(repository, model_control_mode="explicit") as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        for name in ("..", ".", f"../{repository.name}/{TINY_NAME}", "/etc"):
            with pytest.raises(ServiceError, match="no folder"):
                client.portal.call(registry.load, name)  # type: ignore[union-attr]


def test_poll_mode_picks_up_a_new_version_and_a_removed_model(repository: Path) -> None:
    with serve(repository, model_control_mode="poll", repository_poll_secs=0.1) as client:
        assert classify(client) == (200, "1")
        add_version(repository / TINY_NAME, 2)
        assert wait_for(lambda: classify(client) == (200, "2"))
        (repository / TINY_NAME / "3").mkdir()  # broken: polled once, refused, version 2 serves on
        assert wait_for(lambda: "3" in client.get("/health/ready").json()["models"][TINY_NAME]["failed_versions"])
        assert classify(client) == (200, "2")
        (repository / TINY_NAME).rename(repository / f".{TINY_NAME}.gone")
        assert wait_for(lambda: classify(client)[0] == 404)


def wait_for(condition: object, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_the_control_key_guards_the_repository_routes(repository: Path) -> None:
    with serve(repository, model_control_mode="explicit", api_key="serve", control_api_key="control") as client:
        route = f"/v2/repository/models/{TINY_NAME}/load"
        assert client.post(route, headers={"x-api-key": "serve"}).status_code == 401
        assert client.post(route, headers={"x-api-key": "control"}).status_code == 200
        assert client.post("/v2/repository/index", headers={"x-api-key": "serve"}).status_code == 401
        assert client.post(f"/v1/classify?model={TINY_NAME}", headers={**PNG["headers"], "x-api-key": "serve"},
                           content=PNG["content"]).status_code == 200  # fmt: skip


def test_explicit_mode_takes_one_worker_only() -> None:
    with pytest.raises(ValueError, match="one worker"):
        Settings(model_control_mode="explicit", workers=2)


def test_an_unloaded_version_is_freed_by_its_unload(repository: Path) -> None:
    """Nothing the requests it served leave behind (their contexts, say) keeps it: the unload's own
    collection frees it, not a later one (what it misses stays frozen out of the collector's sight)."""
    with serve(repository, model_control_mode="explicit") as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        assert classify(client) == (200, "1")
        freed = weakref.ref(registry.entries[TINY_NAME].versions[1])
        assert client.post(f"/v2/repository/models/{TINY_NAME}/unload").status_code == 200
        assert freed() is None


def test_an_odd_version_in_a_url_is_a_404(repository: Path) -> None:
    with serve(repository) as client:
        for version in ("0", "-1", "%D9%A1", "%2e%2e", "1.0", "9" * 19, "9" * 5000):  # 5000: past int()'s limit
            for method, route in (("GET", "ready"), ("POST", "infer")):
                answer = client.request(method, f"/v2/models/{TINY_NAME}/versions/{version}/{route}")
                assert answer.status_code == 404, (version, answer.text)


def test_a_version_folder_is_named_by_ascii_digits_only(tmp_path: Path) -> None:
    for name in ("2", "02", "0", "٢", "²", ".3.incoming", "4x"):
        (tmp_path / name).mkdir()
    assert version_dirs(tmp_path) == {2: tmp_path / "2"}


def test_a_load_whose_config_serves_nothing_is_refused(repository: Path) -> None:
    """A config.json that does not read, or a version policy that picks no folder present, is the
    load's 400 (not a 200 that changed nothing); what served serves on."""
    policy = {"parameters": {"config": json.dumps({"version_policy": {"specific": {"versions": [7]}}})}}
    with serve(repository, model_control_mode="explicit") as client:
        refused = client.post(f"/v2/repository/models/{TINY_NAME}/load", json=policy)
        assert refused.status_code == 400 and "present: [1]" in refused.json()["error"], refused.text
        (repository / TINY_NAME / "config.json").write_text('{"version_policy": ')
        refused = client.post(f"/v2/repository/models/{TINY_NAME}/load")
        assert refused.status_code == 400 and "version 1 serves on" in refused.json()["error"], refused.text
        assert classify(client) == (200, "1")


def test_a_version_reloaded_in_place_keeps_its_metrics(repository: Path) -> None:
    """Its files changed: the new copy replaces the old, and the old one's unload leaves the series,
    now the new copy's, where they are."""
    with serve(repository, model_control_mode="explicit") as client:
        os.utime(repository / TINY_NAME / "1" / MANIFEST_FILE)  # a changed file: the version loads again
        assert client.post(f"/v2/repository/models/{TINY_NAME}/load").status_code == 200
        assert classify(client) == (200, "1")
        registry = client.app.state.registry  # type: ignore[attr-defined]
        assert wait_for(lambda: not registry.unloading)
        lines = client.get("/metrics").text.splitlines()
        for series in ("vitserve_model_ready", "vitserve_queue_images", "vitserve_batch_size_count"):
            assert any(line.startswith(f"{series}{{") and 'version="1"' in line for line in lines), series


def test_a_model_added_broken_leaves_readiness_alone(repository: Path) -> None:
    """A new model folder that fails to load (by a load call, or polled) is shown failed, while
    readiness, which a load balancer reads for every model, stays 200."""
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "1" / MANIFEST_FILE).write_text("{")
    with serve(repository, model_control_mode="explicit") as client:
        assert client.get("/health/ready").status_code == 503  # there at start: it must load
        assert client.post("/v2/repository/models/broken/unload").status_code == 200
        assert client.get("/health/ready").status_code == 200
        assert client.post("/v2/repository/models/broken/load").status_code == 400
        ready = client.get("/health/ready")
        assert ready.status_code == 200 and ready.json()["models"]["broken"]["state"] == "failed"
        assert client.get("/v2/health/ready").status_code == 200


def http_scope(path: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    """A POST's ASGI scope, for a client driven by hand (one that stalls, or sends its body late)."""
    return {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": list(headers), "http_version": "1.1", "scheme": "http", "client": ("127.0.0.1", 1),
            "server": ("test", 80)}  # fmt: skip


async def stalled_stream(app: object, body: bytes, stalled: asyncio.Event, go_on: asyncio.Event) -> tuple[int, str]:
    """POST /v1/generate as a client that stops reading after the first row until `go_on` (the
    server's send waits, as a full socket makes it): its status and events."""
    sent: dict[str, Any] = {"status": 0, "body": b""}
    bodies = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if bodies:
            return bodies.pop()
        await asyncio.sleep(3600)  # the client never leaves
        return {}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
            sent["version"] = dict(message["headers"]).get(b"x-model-version")
        elif message.get("body"):
            sent["body"] += message["body"]
            stalled.set()
            await go_on.wait()

    await app(http_scope("/v1/generate", (b"content-type", b"application/json")), receive, send)  # type: ignore[operator]
    assert sent["version"] == b"1"
    return sent["status"], sent["body"].decode()


@pytest.mark.parametrize("drained", [True, False], ids=["drained", "past_the_drain"])
def test_an_unload_under_a_stream(
    tiny_generator_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drained: bool
) -> None:
    """A generation stream whose client stalls: the unload waits for it, the stream ends on its
    version with `done`, then the version and its cache pool are freed. An unload that can wait no
    longer (past request_timeout_s and the grace) closes it anyway: the stream ends with an error
    event, never hangs, and what it held is freed as it ends."""
    repository = copy_repository(tiny_generator_repository, tmp_path / "repo")
    monkeypatch.setattr("service.registry.DRAIN_GRACE_S", 0.0)
    timeout = 60.0 if drained else 0.5
    body = json.dumps({"model": "tinygen", "seed": 1, "scale": 1, "stream": True}).encode()
    # with its caches in a pool of the model's (as on a GPU), which a stream holds slots of
    with serve(repository, model_control_mode="explicit", request_timeout_s=timeout, device_cache="on") as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        freed = weakref.ref(registry.entries["tinygen"].versions[1])
        pool = weakref.ref(registry.entries["tinygen"].versions[1].cache_pool)

        async def scenario() -> tuple[int, str]:
            stalled, go_on = asyncio.Event(), asyncio.Event()
            stream = asyncio.create_task(stalled_stream(client.app, body, stalled, go_on))
            await stalled.wait()
            unload = asyncio.create_task(registry.unload("tinygen"))
            await asyncio.sleep(1.0)
            assert unload.done() is not drained  # waits for the stream, or went past it
            go_on.set()
            await unload
            return await asyncio.wait_for(stream, 30)

        status, events = client.portal.call(scenario)  # type: ignore[union-attr]
        assert status == 200
        assert ("event: done" in events) is drained and ("model_unloaded" in events) is not drained, events
        assert wait_for(lambda: freed() is None and pool() is None, 5)  # past the drain: once the stream ended


def test_a_lazy_graph_loads_from_the_files_its_version_loaded(repository: Path) -> None:
    """A version folder replaced in place after its version loaded (export --force): its attention
    graph, loaded on the first attention request, would be another model's; it is refused (503, the
    reason) until a load brings the new files in, all of them."""
    route = f"/v1/classify/attention?model={TINY_NAME}"
    with serve(repository, model_control_mode="explicit") as client:
        os.utime(repository / TINY_NAME / "1" / "attention.onnx")
        refused = client.post(route, **PNG)
        assert refused.status_code == 503 and "changed since it loaded" in refused.text, refused.text
        assert classify(client) == (200, "1")  # what loaded serves on
        assert client.post(f"/v2/repository/models/{TINY_NAME}/load").status_code == 200
        assert client.post(route, **PNG).status_code == 200


def test_an_unload_call_that_times_out_still_frees_the_version(
    tiny_generator_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unload call's 504 (request_timeout_s: a stream holds the version longer) leaves the
    drain going: the version is freed when the stream ends, its series gone."""
    repository = copy_repository(tiny_generator_repository, tmp_path / "repo")
    monkeypatch.setattr("service.registry.DRAIN_GRACE_S", 30.0)
    body = json.dumps({"model": "tinygen", "seed": 1, "scale": 1, "stream": True}).encode()
    with serve(repository, model_control_mode="explicit", request_timeout_s=0.5) as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        freed = weakref.ref(registry.entries["tinygen"].versions[1])

        async def scenario() -> tuple[int, int, str]:
            stalled, go_on = asyncio.Event(), asyncio.Event()
            stream = asyncio.create_task(stalled_stream(client.app, body, stalled, go_on))
            await stalled.wait()
            transport = httpx.ASGITransport(app=client.app)  # type: ignore[arg-type]
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                unload = await http.post("/v2/repository/models/tinygen/unload")
            go_on.set()
            status, events = await asyncio.wait_for(stream, 30)
            while registry.unloading:
                await asyncio.sleep(0.05)
            return unload.status_code, status, events

        unloaded, status, events = client.portal.call(scenario)  # type: ignore[union-attr]
        assert unloaded == 504 and status == 200 and "event: done" in events
        assert freed() is None
        assert 'model="tinygen"' not in client.get("/metrics").text.split("# HELP vitserve_model_ready")[1]


def test_a_load_call_that_times_out_still_loads(repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load longer than request_timeout_s: the call's 504 leaves the load going, to its end."""
    from service import registry as registry_module

    slow = registry_module.load_measured

    def slow_load(*args: Any) -> Any:
        time.sleep(1.0)
        return slow(*args)

    with serve(repository, model_control_mode="explicit", request_timeout_s=0.3) as client:
        monkeypatch.setattr(registry_module, "load_measured", slow_load)
        add_version(repository / TINY_NAME, 2)
        assert client.post(f"/v2/repository/models/{TINY_NAME}/load").status_code == 504
        assert wait_for(lambda: classify(client) == (200, "2"))


def test_mended_permissions_are_a_change_of_the_files(tmp_path: Path) -> None:
    """Poll mode tries a failed version again when its files change: a chmod is one."""
    (tmp_path / "model.onnx").write_bytes(b"x")
    before = fingerprint(tmp_path)
    (tmp_path / "model.onnx").chmod(0o600)
    assert fingerprint(tmp_path) != before


def test_an_image_view_request_finishes_on_the_version_it_began_on(repository: Path) -> None:
    """/v2's image view picks its version before reading the body: a reload while the body comes
    in (v2 replacing v1) leaves the request on v1, not a 404 for the version that left the lookup."""
    blob = struct.pack("<I", len(PNG["content"])) + PNG["content"]
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(blob)}}
    head = json.dumps({"inputs": [tensor]}).encode()
    with serve(repository, model_control_mode="explicit") as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        v1 = registry.entries[TINY_NAME].versions[1]

        async def scenario() -> tuple[int, dict[str, Any]]:
            body_sent = asyncio.Event()
            sent: dict[str, Any] = {"body": b""}

            async def receive() -> dict[str, Any]:
                await body_sent.wait()  # the body is slow to come
                return {"type": "http.request", "body": head + blob, "more_body": False}

            async def send(message: dict[str, Any]) -> None:
                sent["status"] = message.get("status", sent.get("status"))
                sent["body"] += message.get("body", b"")

            scope = http_scope(f"/v2/models/{TINY_NAME}_image/infer", (HEADER_LENGTH, str(len(head)).encode()))
            request = asyncio.create_task(client.app(scope, receive, send))  # type: ignore[attr-defined]
            while not v1.leases:  # the request holds v1
                await asyncio.sleep(0.01)
            add_version(repository / TINY_NAME, 2)
            await registry.load(TINY_NAME)  # v2 serves; v1 drains
            body_sent.set()
            await request
            return sent["status"], json.loads(sent["body"])

        status, answer = client.portal.call(scenario)  # type: ignore[union-attr]
        assert status == 200 and answer["model_version"] == "1", answer


def test_a_reload_while_a_lazy_graph_loads(repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An attention request loading v1's attention graph (its first) when v2 replaces v1: it gets
    its answer from v1, which the reload waits for before freeing it."""
    from service import repository as repository_module

    started, load_graph = threading.Event(), repository_module.load_graph

    def slow_load(model: Any, graph: str, *args: Any) -> None:
        started.set()
        time.sleep(1.0)
        load_graph(model, graph, *args)

    monkeypatch.setattr(repository_module, "load_graph", slow_load)
    with serve(repository, model_control_mode="explicit") as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        freed = weakref.ref(registry.entries[TINY_NAME].versions[1])
        answers: list[Any] = []
        attention = threading.Thread(
            target=lambda: answers.append(client.post(f"/v1/classify/attention?model={TINY_NAME}", **PNG))
        )
        attention.start()
        assert started.wait(10)
        add_version(repository / TINY_NAME, 2)
        assert client.post(f"/v2/repository/models/{TINY_NAME}/load").status_code == 200
        assert classify(client) == (200, "2")
        attention.join(30)
        assert answers[0].status_code == 200 and answers[0].headers["x-model-version"] == "1"
        assert wait_for(lambda: freed() is None, 5)


def test_concurrent_loads_and_unloads_take_turns(repository: Path) -> None:
    """Loads and unloads of one model asked at once run one at a time, in the order asked: the last
    one decides what serves, and each version that left is freed."""
    with serve(repository, model_control_mode="explicit") as client:
        registry = client.app.state.registry  # type: ignore[attr-defined]
        first = weakref.ref(registry.entries[TINY_NAME].versions[1])

        async def scenario() -> None:
            calls = [registry.unload, registry.load, registry.load, registry.unload, registry.load]
            await asyncio.gather(*(call(TINY_NAME) for call in calls))
            await asyncio.gather(*registry.unloading.values())

        client.portal.call(scenario)  # type: ignore[union-attr]
        assert classify(client) == (200, "1")
        assert first() is None and not registry.unloading
        gc.unfreeze()  # what an unload's collection froze is out of get_objects' sight
        alive = [m for m in gc.get_objects() if type(m) is ServedModel and m.name == TINY_NAME]
        assert alive == [registry.entries[TINY_NAME].versions[1]]


def test_with_several_workers_an_unloaded_version_leaves_the_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several workers write their metrics to files, where prometheus-client cannot remove a series:
    /metrics leaves out those of the versions the answering worker unloaded (until loaded again)."""
    from prometheus_client import values

    from service.metrics import MULTIPROCESS_DIR, Metrics

    monkeypatch.setenv(MULTIPROCESS_DIR, str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())  # as at import with the variable set
    metrics = Metrics()
    for version in (1, 2):
        metrics.model_loaded(TINY_NAME, version, True, 0.5, 1000)
        metrics.track_batcher(TINY_NAME, version, "main", lambda: 0.0)(1)
    metrics.model_unloaded(TINY_NAME, 1, ["main"])
    text = metrics.exposition()[0].decode()
    assert 'version="2"' in text and 'version="1"' not in text
    metrics.model_loaded(TINY_NAME, 1, True, 0.5, 1000)
    assert 'vitserve_model_ready{model="tiny",version="1"} 1.0' in metrics.exposition()[0].decode()


def test_a_broken_config_is_logged_once_not_at_every_poll(repository: Path, caplog: pytest.LogCaptureFixture) -> None:
    with serve(repository, model_control_mode="poll", repository_poll_secs=0.05) as client:
        (repository / TINY_NAME / "config.json").write_text("{")
        time.sleep(1.0)  # 20 polls
        assert classify(client) == (200, "1")
    assert sum("ModelConfig" in record.getMessage() for record in caplog.records) == 1
