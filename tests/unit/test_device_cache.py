"""Generation's key/value cache kept on the session's device between steps (I/O binding), exercised on
VITSERVE_DEVICE's provider (the CPU here; CUDA under bench/gpu.sh): the same images as the host-side
cache, and used only by a generation stepping alone."""

from __future__ import annotations

import asyncio

import numpy as np

from service.repository import load_model
from service.sampling import DeviceCache, GenerationConfig, device_steps, finished, sample, sample_rows
from service.settings import Settings
from service.tasks import TASKS, manifest_checks
from tests.conftest import SHIPPED_REPOSITORY, client_for

GENERATOR = SHIPPED_REPOSITORY / "imagetransformer"


def test_device_cache_gives_the_images_of_the_host_cache() -> None:
    model = load_model(GENERATOR, Settings(warmup=False), manifest_checks(TASKS))
    assert model.manifest is not None
    cfg = GenerationConfig.model_validate(model.manifest.config)
    session = model.sessions["step"]
    labels = np.array([0, 3, 7, 7, 10], dtype=np.int64)  # 10: no label
    host = sample(session, cfg, labels, seed=4)

    async def device() -> np.ndarray:
        steps = device_steps(DeviceCache(session, cfg, len(labels)), None)
        rows = sample_rows(None, cfg, labels, np.random.default_rng(4), steps=steps)  # type: ignore[arg-type]
        return await finished(rows)

    np.testing.assert_array_equal(asyncio.run(device()), host)
    assert len(np.unique(host.reshape(len(labels), -1), axis=0)) == len(labels)  # real, distinct images


def test_only_a_generation_stepping_alone_keeps_its_cache_on_the_device() -> None:
    model = load_model(GENERATOR, Settings(warmup=False), manifest_checks(TASKS))
    assert model.manifest is not None
    cfg = GenerationConfig.model_validate(model.manifest.config)
    assert model.device_steps(cfg, 2) is not None
    reservation = model.reserve(2, "step")  # another generation under way: share its steps instead
    assert reservation is not None and model.device_steps(cfg, 2) is None
    reservation.release()
    assert model.device_steps(cfg, 2) is not None
    assert model.device_steps(cfg, 2, mode="off") is None
    assert model.device_steps(cfg, 2, mode="auto") is None  # on the CPU: no bus to spare
    unbatched = load_model(GENERATOR, Settings(warmup=False, batching=False), manifest_checks(TASKS))
    assert unbatched.device_steps(cfg, 2) is not None


def test_the_service_answers_the_same_images_either_way() -> None:
    body = {"label": "5", "num_images": 3, "seed": 11, "scale": 1}
    answers = []
    for device_cache in ("on", "off"):
        for client in client_for(Settings(model_repository=SHIPPED_REPOSITORY, device_cache=device_cache)):
            answers.append(client.post("/v1/generate", json=body))
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json()["images"] == answers[1].json()["images"]
