"""Generation's key/value caches in a pool on the session's device (the pooled step graph, bound in
place), exercised on VITSERVE_DEVICE's provider (the CPU here; CUDA under bench/gpu.sh): the images of
the host-side cache, steps shared across requests, and every slot back in the pool however a
generation ends."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.onnx_export import ExportError
from export.pooled import pooled_spec, pooled_step, write_pooled
from service.repository import ServedModel, load_model
from service.sampling import POOLED_GRAPH, CachePool, GenerationConfig, finished, pooled_steps, sample, sample_rows
from service.settings import Settings
from service.tasks import TASKS, manifest_checks
from tests.conftest import SHIPPED_REPOSITORY, client_for

GENERATOR = SHIPPED_REPOSITORY / "imagetransformer"


def generator(**settings: object) -> ServedModel:
    model = load_model(GENERATOR, Settings(warmup=False, **settings), manifest_checks(TASKS))  # type: ignore[arg-type]
    assert model.state == "ready", model.reason
    return model


def test_pooled_steps_give_the_images_of_the_host_cache_even_in_reused_slots() -> None:
    model = generator(device_cache="on")
    assert model.manifest is not None and model.cache_pool is not None
    cfg = GenerationConfig.model_validate(model.manifest.config)
    labels = np.array([0, 3, 7, 7, 10], dtype=np.int64)  # 10: no label
    host = sample(model.sessions["step"], cfg, labels, seed=4)
    pool = CachePool(model.sessions[POOLED_GRAPH], capacity=8)

    async def pooled(slots: np.ndarray) -> np.ndarray:
        async def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return pool.run(feeds)

        return await finished(sample_rows(pooled_steps(run, slots), cfg, labels, np.random.default_rng(4)))

    first = pool.acquire(5)
    np.testing.assert_array_equal(asyncio.run(pooled(first)), host)
    pool.release(first)
    again = np.array([7, 2, 0, 4, 6], dtype=np.int64)  # other slots, some holding the last images' caches
    np.testing.assert_array_equal(asyncio.run(pooled(again)), host)
    assert len(np.unique(host.reshape(len(labels), -1), axis=0)) == len(labels)  # real, distinct images


def test_the_pool_is_loaded_where_asked_for() -> None:
    assert generator(device_cache="on").cache_pool is not None
    assert generator(device_cache="off").cache_pool is None
    assert generator(device_cache="auto").cache_pool is None  # on the CPU: no bus to spare
    assert POOLED_GRAPH not in generator(device_cache="auto").sessions


def test_concurrent_generations_share_pooled_steps_and_get_their_own_images() -> None:
    """Eight clients at once, streaming and not: each gets the images it gets through the host cache,
    runs were shared, and every slot and every bit of queue room is back at the end."""
    bodies = [{"label": str(i % 10), "num_images": 1 + i % 3, "seed": i, "scale": 1, "stream": i % 2 == 1}
              for i in range(8)]  # fmt: skip
    answers: dict[str, list[str]] = {}
    for mode in ("off", "on"):
        settings = Settings(model_repository=SHIPPED_REPOSITORY, device_cache=mode)
        for client in client_for(settings):

            def generate(body: dict[str, object], client: object = client) -> str:
                response = client.post("/v1/generate", json=body)  # type: ignore[attr-defined]
                assert response.status_code == 200, response.text
                return str(response.text.rsplit("data: ", 1)[-1] if body["stream"] else response.text)

            with ThreadPoolExecutor(len(bodies)) as threads:
                answers[mode] = [a.split('"images":', 1)[1] for a in threads.map(generate, bodies)]
            model = client.app.state.registry.models["imagetransformer"]  # type: ignore[attr-defined]
            if mode == "on":
                assert max(model.batchers[POOLED_GRAPH].batch_sizes) > 3  # steps of several requests in one run
                assert len(model.cache_pool.free) == model.cache_pool.capacity  # every slot back
                assert model.batchers[POOLED_GRAPH].reserved == 0
    assert answers["on"] == answers["off"]


def test_slots_come_back_when_a_stream_is_left_half_way() -> None:
    for client in client_for(Settings(model_repository=SHIPPED_REPOSITORY, device_cache="on")):
        model = client.app.state.registry.models["imagetransformer"]  # type: ignore[attr-defined]
        with client.stream("POST", "/v1/generate", json={"num_images": 5, "stream": True}) as response:
            next(response.iter_lines())  # the first row, then the client leaves
        for _ in range(100):
            if len(model.cache_pool.free) == model.cache_pool.capacity:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert len(model.cache_pool.free) == model.cache_pool.capacity and model.batchers[POOLED_GRAPH].reserved == 0
        assert client.post("/v1/generate", json={"num_images": 2, "seed": 1}).status_code == 200


def test_without_batching_a_full_pool_answers_503() -> None:
    settings = Settings(model_repository=SHIPPED_REPOSITORY, device_cache="on", batching=False)
    for client in client_for(settings):
        model = client.app.state.registry.models["imagetransformer"]  # type: ignore[attr-defined]
        held = model.cache_pool.acquire(len(model.cache_pool.free) - 1)
        response = client.post("/v1/generate", json={"num_images": 2})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert client.post("/v1/generate", json={"num_images": 1}).status_code == 200
        model.cache_pool.release(held)


def test_the_pooled_graph_is_built_from_any_step_graph_that_follows_the_names(tmp_path: Path) -> None:
    folder = GENERATOR / "1"
    manifest = model_manifest()
    spec = pooled_spec(manifest.graphs["step"])
    assert spec == manifest.graphs[POOLED_GRAPH]  # the shipped one is what export writes
    (tmp_path / "step.onnx").write_bytes((folder / "step.onnx").read_bytes())
    assert write_pooled(manifest.graphs["step"], tmp_path) == spec  # and it checks it
    scoring = onnx.load(folder / "score.onnx")  # no cache in, none out
    with pytest.raises(ExportError, match="past_key_values"):
        pooled_step(scoring)


def model_manifest():  # type: ignore[no-untyped-def]
    from service.manifest import read_manifest

    return read_manifest(GENERATOR / "1")


def test_a_broken_pooled_graph_leaves_generation_on_the_host_cache(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(GENERATOR, tmp_path / "imagetransformer")
    (tmp_path / "imagetransformer" / "1" / "pooled_step.onnx").write_bytes(b"not a graph")
    for client in client_for(Settings(model_repository=tmp_path, device_cache="on")):
        ready = client.get("/health/ready").json()["models"]["imagetransformer"]
        assert ready["state"] == "ready" and "pooled_step" in ready["failed_graphs"]
        assert client.post("/v1/generate", json={"num_images": 2, "seed": 1}).status_code == 200
