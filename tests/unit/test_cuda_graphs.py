"""CUDA graphs with batches padded to the warmed sizes (`runtime.Replays`): the path a GPU takes with
VITSERVE_CUDA_GRAPHS, run here on VITSERVE_DEVICE's provider (the CPU in CI, where ONNX Runtime
ignores the graph ids; CUDA under bench/gpu.sh). Same answers as plain runs, the same buffers every
run, padding that never touches a generation's cache, and the whole service on this path."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

import service.repository
import service.sampling
from service.manifest import GenerationConfig, read_manifest
from service.repository import load_model
from service.runtime import FixedBinding, Replays, create_session, cuda_graph, padded, run
from service.sampling import POOLED_GRAPH, CachePool, PooledSteps, finished, sample, sample_rows
from service.settings import Settings
from service.tasks import TASKS, manifest_checks
from tests.conftest import SHIPPED_REPOSITORY, client_for
from tests.helpers import encode

VIT = SHIPPED_REPOSITORY / "vit" / "1"


def test_padding_copies_the_last_row_or_fills() -> None:
    rows = np.arange(6).reshape(3, 2)
    assert padded(rows, 3) is rows
    assert padded(rows, 5).tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]
    assert padded(np.array([3, 1]), 4, fill=9).tolist() == [3, 1, 9, 9]


def test_replays_answer_as_plain_runs_through_the_same_buffers_at_every_size() -> None:
    session = create_session(VIT / "model.onnx", Settings())
    fallbacks: list[int] = []

    def fallback(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        fallbacks.append(len(feeds["pixel_values"]))
        return run(session, feeds, io_binding=False)

    replays = Replays(session, [1, 2, 4, 8], fallback)
    pointers = {size: b.inputs["pixel_values"].data_ptr() for size, b in replays.bindings.items()}
    rng = np.random.default_rng(0)
    for rows in (1, 3, 2, 5, 8, 7, 11, 1):
        feeds = {"pixel_values": rng.normal(size=(rows, 1, 32, 32)).astype(np.float32)}
        (logits,) = replays(feeds)
        assert logits.shape == (rows, 10)
        np.testing.assert_allclose(logits, run(session, feeds, io_binding=False)[0], rtol=0, atol=1e-5)
    assert fallbacks == [11]  # larger than every warmed size: an ordinary run
    assert {size: b.inputs["pixel_values"].data_ptr() for size, b in replays.bindings.items()} == pointers


def test_every_captured_run_happens_on_one_thread_whoever_asks() -> None:
    """ONNX Runtime keeps a captured graph in the capturing thread's context: warm-up (the loading
    thread), the model's inference threads and the event loop must all replay on the same one."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    session = create_session(VIT / "model.onnx", Settings())
    replays = Replays(session, [1, 2], lambda feeds: run(session, feeds, io_binding=False))
    threads: set[int] = set()
    for binding in replays.bindings.values():
        real = binding.run

        def recorded(feeds: dict[str, np.ndarray], real: object = real) -> list[np.ndarray]:
            threads.add(threading.get_ident())
            return real(feeds)  # type: ignore[operator,no-any-return]

        binding.run = recorded  # type: ignore[method-assign]
    image = np.zeros((1, 1, 32, 32), dtype=np.float32)
    replays({"pixel_values": image})
    with ThreadPoolExecutor(4) as callers:
        list(callers.map(lambda n: replays({"pixel_values": image.repeat(n, 0)}), [1, 2, 1, 2, 2, 1]))
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_a_fixed_binding_answers_as_run() -> None:
    session = create_session(VIT / "model.onnx", Settings())
    fixed = FixedBinding(session, 4)
    feeds = {"pixel_values": np.random.default_rng(1).normal(size=(4, 1, 32, 32)).astype(np.float32)}
    np.testing.assert_allclose(fixed.run(feeds)[0], run(session, feeds, io_binding=False)[0], rtol=0, atol=1e-6)


@pytest.fixture
def replaying(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every session taken for one with CUDA graphs on: the service builds its Replays."""
    for module in (service.runtime, service.repository, service.sampling):
        monkeypatch.setattr(module, "cuda_graph", lambda session: True)


@pytest.mark.usefixtures("replaying")
def test_padding_rows_write_the_spare_slot_only() -> None:
    model = load_model(SHIPPED_REPOSITORY / "imagetransformer", Settings(warmup=False, device_cache="on"),
                       manifest_checks(TASKS))  # fmt: skip
    assert model.manifest is not None
    cfg = GenerationConfig.model_validate(model.manifest.config)
    pool = CachePool(model.sessions[POOLED_GRAPH], capacity=6, sizes=[1, 4, 8])
    assert isinstance(pool.replays_or_plain, Replays)
    labels = np.array([2, 5, 9], dtype=np.int64)  # 3 images: every run padded to 4
    others = pool.acquire(3)
    slots = pool.acquire(3)
    assert pool.acquire(0).size == 0 and 6 not in [*others, *slots]  # the spare row is no one's
    before = [value.numpy()[others].copy() for value in pool.bound.values()]

    async def generate() -> np.ndarray:
        async def step(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return pool.run(feeds)

        return await finished(sample_rows(PooledSteps(step, pool, slots, None), cfg, labels, np.random.default_rng(7)))

    np.testing.assert_array_equal(asyncio.run(generate()), sample(model.sessions["step"], cfg, labels, seed=7))
    after = [value.numpy()[others] for value in pool.bound.values()]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))  # untouched by the padding
    assert any(value.numpy()[6].any() for value in pool.bound.values())  # the padding went to the spare row


@pytest.fixture
def replaying_client(replaying: None) -> Iterator[object]:
    yield from client_for(Settings(model_repository=SHIPPED_REPOSITORY, device_cache="on"))


def test_the_service_serves_through_replays(replaying_client: object) -> None:
    client = replaying_client
    models = client.app.state.registry.models  # type: ignore[attr-defined]
    assert isinstance(models["vit"].runs["main"], Replays) and isinstance(models["detr"].runs["main"], Replays)
    from sklearn.datasets import load_sample_image

    photo = encode(Image.fromarray(load_sample_image("china.jpg")), "JPEG")
    answer = client.post("/v1/classify", files={"file": ("p.jpg", photo)})  # type: ignore[attr-defined]
    boxes = client.post("/v1/detect", files={"file": ("p.jpg", photo)})  # type: ignore[attr-defined]
    images = client.post("/v1/generate", json={"num_images": 3, "seed": 5})  # type: ignore[attr-defined]
    assert answer.status_code == boxes.status_code == images.status_code == 200
    for plain in client_for(Settings(model_repository=SHIPPED_REPOSITORY, device_cache="off")):
        expected = plain.post("/v1/classify", files={"file": ("p.jpg", photo)}).json()
        assert answer.json() == expected  # float32 both ways: the same scores to the last digit shown
        assert images.json()["images"] == plain.post("/v1/generate", json={"num_images": 3, "seed": 5}).json()["images"]


def test_a_graph_onnx_runtime_cannot_capture_runs_without_cuda_graphs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ONNX Runtime refuses CUDA graphs for a graph with nodes it left on the CPU: that graph serves
    without them, saying why, rather than taking its model down."""
    from service import runtime

    asked: list[list[dict[str, str]]] = []
    real = ort.InferenceSession

    def session(
        path: str, options: object, providers: list[str], provider_options: list[dict[str, str]], **kwargs: object
    ) -> object:
        asked.append(provider_options)
        if provider_options[0].get("enable_cuda_graph") == "1":
            raise RuntimeError("This session cannot use the graph capture feature as requested by the user")
        return real(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(runtime, "requested_providers", lambda device, tensorrt=False: [runtime.CUDA, runtime.CPU])
    monkeypatch.setattr(ort, "InferenceSession", session)
    spec = read_manifest(VIT).main
    create_session(VIT / "model.onnx", Settings(cuda_graphs=True, cuda_fallback=True), spec)
    assert [options[0].get("enable_cuda_graph") for options in asked] == ["1", None]
    assert "no CUDA graphs, ONNX Runtime refused them" in caplog.text


ON_GPU = "CUDAExecutionProvider" in ort.get_available_providers() and Settings().device != "cpu"


@pytest.mark.skipif(not ON_GPU, reason="needs onnxruntime's CUDA provider and a GPU (bench/gpu.sh runs it)")
def test_captured_cuda_graphs_answer_as_ordinary_runs() -> None:
    from sklearn.datasets import load_sample_image

    photo = encode(Image.fromarray(load_sample_image("flower.jpg")), "JPEG")
    answers: dict[bool, tuple[list[float], int]] = {}
    for graphs in (False, True):
        settings = Settings(model_repository=SHIPPED_REPOSITORY, device="cuda", cuda_graphs=graphs, device_cache="on")
        for client in client_for(settings):
            models = client.app.state.registry.models  # type: ignore[attr-defined]
            assert cuda_graph(models["vit"].sessions["main"]) is graphs
            scores = [
                [r["score"] for r in client.post("/v1/classify", files={"file": ("p.jpg", photo)}).json()["results"][0]]
                for _ in range(3)  # captured on warm-up, replayed here
            ]
            assert scores[0] == scores[1] == scores[2]
            generated = client.post("/v1/generate", json={"num_images": 5, "seed": 2})
            answers[graphs] = (scores[0], generated.status_code)
    np.testing.assert_allclose(answers[True][0], answers[False][0], atol=1e-4)
    assert answers[True][1] == answers[False][1] == 200


@pytest.mark.usefixtures("replaying")
def test_one_run_at_a_time_updates_the_pools_replayed_or_not() -> None:
    """Without batching, warmed size 1 only: a one-image generation replays, a three-image one falls
    back; both must still take turns on the pools (found by a hostile review)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    settings = Settings(model_repository=SHIPPED_REPOSITORY, device_cache="on", batching=False)
    client = next(clients := client_for(settings))
    model = client.app.state.registry.models["imagetransformer"]  # type: ignore[attr-defined]
    assert list(model.cache_pool.replays_or_plain.bindings) == [1]
    session = model.sessions[POOLED_GRAPH]
    real, lock, counts = session.run_with_iobinding, threading.Lock(), {"now": 0, "most": 0}

    def counted(*args: object) -> None:
        with lock:
            counts["now"] += 1
            counts["most"] = max(counts["most"], counts["now"])
        time.sleep(0.002)
        real(*args)
        with lock:
            counts["now"] -= 1

    session.run_with_iobinding = counted
    bodies = [{"num_images": 1, "seed": 1}, {"num_images": 3, "seed": 2}] * 2
    with ThreadPoolExecutor(4) as threads:
        codes = list(threads.map(lambda b: client.post("/v1/generate", json=b).status_code, bodies))
    clients.close()
    assert codes == [200] * 4 and counts["most"] == 1


def overlap_counter(session: ort.InferenceSession) -> dict[str, int]:
    """Counts the session's runs in flight (plain and bound), recording the most at once."""
    import threading
    import time

    lock, counts = threading.Lock(), {"now": 0, "most": 0, "runs": 0}

    def counted(real: Callable[..., object]) -> Callable[..., object]:
        def run(*args: object) -> object:
            with lock:
                counts["now"] += 1
                counts["runs"] += 1
                counts["most"] = max(counts["most"], counts["now"])
            time.sleep(0.002)
            try:
                return real(*args)
            finally:
                with lock:
                    counts["now"] -= 1

        return run

    session.run = counted(session.run)  # type: ignore[method-assign]
    session.run_with_iobinding = counted(session.run_with_iobinding)  # type: ignore[method-assign]
    return counts


def test_a_session_with_graphs_on_runs_one_at_a_time_captured_or_not() -> None:
    """ONNX Runtime: a session with CUDA graphs on must not be run from several threads at once. Runs
    larger than every warmed size (uncaptured) take the same single thread as the replays."""
    from concurrent.futures import ThreadPoolExecutor

    session = create_session(VIT / "model.onnx", Settings())
    replays = Replays(session, [1, 2], lambda feeds: run(session, feeds, io_binding=False))
    counts = overlap_counter(session)
    rows = [1, 5, 2, 7, 1, 3, 2, 6] * 3  # 5, 7, 3 and 6 are over every warmed size
    with ThreadPoolExecutor(8) as callers:
        answers = list(callers.map(lambda n: replays({"pixel_values": np.zeros((n, 1, 32, 32), np.float32)}), rows))
    assert [len(logits) for (logits,) in answers] == rows
    assert counts["runs"] == len(rows) and counts["most"] == 1


@pytest.mark.usefixtures("replaying")
def test_graphs_on_are_warmed_up_even_with_warm_up_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Captured under live traffic, another thread's allocation or synchronous copy breaks a capture."""
    warmed: list[tuple[list[int], int]] = []

    def warm_up(run: object, spec: object, sizes: list[int], times: int, side: int = 1) -> None:
        warmed.append((sizes, times))

    monkeypatch.setattr(service.repository, "warm_up", warm_up)
    model = load_model(SHIPPED_REPOSITORY / "vit", Settings(warmup=False, lazy_attention=False), manifest_checks(TASKS))
    assert model.state == "ready", model.reason
    assert warmed == [([1, 2, 4, 8, 16, 32], 3), ([1], 3)]  # the model's graph and its attention graph
