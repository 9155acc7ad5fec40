"""Generation's key/value caches in a pool on the session's device (the pooled step graph, bound in
place), exercised on VITSERVE_DEVICE's provider (the CPU here; CUDA under bench/gpu.sh): the images of
the host-side cache, steps shared across requests, and every slot back in the pool however a
generation ends."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.onnx_export import ExportError
from export.pooled import pooled_spec, pooled_step, write_pooled
from service.errors import ServiceError
from service.manifest import GenerationConfig
from service.repository import ServedModel, load_model
from service.runtime import CPU, requested_providers
from service.sampling import POOLED_GRAPH, CachePool, PooledSteps, finished, sample, sample_rows
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

        return await finished(sample_rows(PooledSteps(run, pool, slots, None), cfg, labels, np.random.default_rng(4)))

    first = pool.acquire(5)
    np.testing.assert_array_equal(asyncio.run(pooled(first)), host)
    pool.release(first)
    again = np.array([7, 2, 0, 4, 6], dtype=np.int64)  # other slots, some holding the last images' caches
    np.testing.assert_array_equal(asyncio.run(pooled(again)), host)
    assert len(np.unique(host.reshape(len(labels), -1), axis=0)) == len(labels)  # real, distinct images


def test_the_pool_is_loaded_where_asked_for() -> None:
    assert generator(device_cache="on").cache_pool is not None
    assert generator(device_cache="off").cache_pool is None
    on_gpu = requested_providers(Settings().device)[0] != CPU  # VITSERVE_DEVICE=cuda under bench/gpu.sh
    auto = generator(device_cache="auto")
    assert (auto.cache_pool is not None) is on_gpu  # on the CPU: no bus to spare
    assert (POOLED_GRAPH in auto.sessions) is on_gpu


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
        assert "has 1 of its 256 cache slots free" in response.json()["error"]["message"]
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


class HeldStep:
    """A graph run that holds the first step at `position` until `gate` opens, as a busy thread would."""

    def __init__(self, real: Callable[[dict[str, np.ndarray]], list[np.ndarray]], position: int) -> None:
        self.real, self.position = real, position
        self.started, self.gate = threading.Event(), threading.Event()

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if int(feeds["position"][0]) == self.position and not self.gate.is_set():
            self.started.set()
            self.gate.wait(10)
        return self.real(feeds)


async def left_mid_step(model: ServedModel, cfg: GenerationConfig, batch: int, held: HeldStep) -> None:
    """A generation of `batch` images whose client leaves while `held` holds one of its steps; it
    releases what it holds as the route does, in its `finally`."""
    sampler = model.sampler(cfg, batch)

    async def generate() -> None:
        try:
            labels = np.arange(batch) % cfg.num_classes
            await finished(sample_rows(sampler.step, cfg, labels, np.random.default_rng(1)))
        finally:
            sampler.release()

    task = asyncio.create_task(generate())
    while not held.started.is_set():
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_step_left_running_by_its_client_keeps_its_slot_until_it_ends() -> None:
    """Without batching, a generation cancelled (client gone, timeout) while a step of its runs in a
    thread must not hand its slot to a new generation before that step has written it: the new
    owner's cache would be overwritten after its reset (found by a hostile review)."""
    model = generator(device_cache="on", batching=False)
    assert model.manifest is not None and model.cache_pool is not None and not model.batchers
    cfg = GenerationConfig.model_validate(model.manifest.config)
    pool = model.cache_pool
    held = model.runs[POOLED_GRAPH] = HeldStep(model.runs[POOLED_GRAPH], position=5)
    expected = sample(model.sessions["step"], cfg, np.array([7]), seed=3)

    async def scenario() -> np.ndarray:
        others = pool.acquire(pool.capacity - 1)  # a busy server: one slot left
        await left_mid_step(model, cfg, 1, held)
        assert pool.free == []  # its step still runs: the slot is still its
        with pytest.raises(ServiceError, match="0 of its 256 cache slots free"):
            model.sampler(cfg, 1)
        held.gate.set()
        while not pool.free:
            await asyncio.sleep(0.001)
        new = model.sampler(cfg, 1)  # the same slot, now that the step has ended
        images = await finished(sample_rows(new.step, cfg, np.array([7]), np.random.default_rng(3)))
        new.release()
        pool.release(others)
        return images

    np.testing.assert_array_equal(asyncio.run(scenario()), expected)
    assert sorted(model.cache_pool.free) == list(range(model.cache_pool.capacity))


def test_a_pooled_graph_that_fails_its_check_leaves_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import export.pooled

    for name in ("step.onnx", "pooled_step.onnx"):
        (tmp_path / name).write_bytes((GENERATOR / "1" / name).read_bytes())
    before = (tmp_path / "pooled_step.onnx").read_bytes()

    def wrong(*_: object) -> None:
        raise ExportError("pooled_step.onnx does not compute what step.onnx does")

    monkeypatch.setattr(export.pooled, "check_pooled", wrong)
    with pytest.raises(ExportError):
        write_pooled(model_manifest().graphs["step"], tmp_path)
    assert (tmp_path / "pooled_step.onnx").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pooled_step.onnx", "step.onnx"]


def test_the_pooled_graph_keeps_the_step_graphs_position_type(tmp_path: Path) -> None:
    """A step graph taking int32 positions (the reset compares them with a zero of that type)."""
    from onnx import TensorProto, helper

    step = onnx.load(GENERATOR / "1" / "step.onnx")
    position = next(v for v in step.graph.input if v.name == "position")
    position.type.tensor_type.elem_type = TensorProto.INT32
    for node in step.graph.node:
        node.input[:] = ["position64" if name == "position" else name for name in node.input]
    step.graph.node.insert(0, helper.make_node("Cast", ["position"], ["position64"], to=TensorProto.INT64))
    onnx.save(step, tmp_path / "step.onnx")
    spec = model_manifest().graphs["step"]
    inputs = [t.model_copy(update={"dtype": "int32"}) if t.name == "position" else t for t in spec.inputs]
    pooled = write_pooled(spec.model_copy(update={"inputs": inputs}), tmp_path)  # built, loaded and checked
    assert next(t for t in pooled.inputs if t.name == "position").dtype == "int32"


def test_publishing_refuses_a_model_with_a_graph_that_does_not_load(tmp_path: Path) -> None:
    import shutil

    from export.onnx_export import publish

    staged = tmp_path / "staged" / "imagetransformer" / "1"
    shutil.copytree(GENERATOR / "1", staged)
    (staged / "pooled_step.onnx").write_bytes(b"not a graph")
    with pytest.raises(ExportError, match="pooled_step"):
        publish(model_manifest(), staged, tmp_path / "repository")
    assert not (tmp_path / "repository" / "imagetransformer").exists()


def test_the_queue_room_comes_back_with_the_slots_not_before() -> None:
    """With batching, a cancelled generation's room and slots both wait for its running step: the
    room alone back first would admit a generation the pool has no slots for (found by a review)."""
    model = load_model(GENERATOR, Settings(warmup=False, device_cache="on", max_images_per_request=4,
                                           batch_policy={"imagetransformer": {"max_queue_size": 4}}),
                       manifest_checks(TASKS))  # fmt: skip
    assert model.manifest is not None and model.cache_pool is not None and model.cache_pool.capacity == 4
    cfg = GenerationConfig.model_validate(model.manifest.config)
    batcher, pool = model.batchers[POOLED_GRAPH], model.cache_pool
    held = batcher.run_graph = HeldStep(batcher.run_graph, position=3)

    async def scenario() -> None:
        await left_mid_step(model, cfg, 4, held)
        assert batcher.reserved == 4 and pool.free == []  # both held while the step runs
        with pytest.raises(ServiceError, match="images queued"):  # the queue's own 503
            model.sampler(cfg, 1)
        held.gate.set()
        while batcher.reserved:
            await asyncio.sleep(0.001)
        assert sorted(pool.free) == [0, 1, 2, 3]
        model.sampler(cfg, 4).release()  # room and slots for a new one

    asyncio.run(scenario())


def test_a_step_that_fails_after_its_client_left_is_not_an_unread_error() -> None:
    import gc

    class Pool:
        def __init__(self) -> None:
            self.free: list[int] = []

        def release(self, slots: np.ndarray) -> None:
            self.free.extend(int(s) for s in slots)

    async def failing(_: dict[str, np.ndarray]) -> list[np.ndarray]:
        await asyncio.sleep(0.02)
        raise RuntimeError("step failed")

    unread: list[object] = []

    async def scenario() -> list[int]:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: unread.append(context))
        pool = Pool()
        steps = PooledSteps(failing, pool, np.array([1, 2]), None)  # type: ignore[arg-type]
        task = asyncio.create_task(steps({"position": np.zeros(2)}))
        await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)  # the step fails, then the generation lets go
        steps.release()
        del steps, task
        gc.collect()
        await asyncio.sleep(0)
        return pool.free

    assert asyncio.run(scenario()) == [1, 2]
    gc.collect()
    assert unread == []
