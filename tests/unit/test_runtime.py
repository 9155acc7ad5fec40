"""Session creation and the two ways of running a session."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from service.runtime import (
    CPU,
    CUDA,
    DeviceUnavailable,
    check_device,
    create_session,
    on_cuda,
    provider_options,
    requested_providers,
    run,
)
from service.settings import PROJECT_ROOT, Settings

VIT = PROJECT_ROOT / "model_repository" / "vit" / "1" / "model.onnx"


def test_io_binding_gives_the_same_outputs_as_run() -> None:
    """The path used on CUDA, exercised on the CPU provider (the same ONNX Runtime API)."""
    session = create_session(VIT, Settings(device="cpu"))
    feeds = {"pixel_values": np.random.default_rng(0).normal(size=(3, 1, 32, 32)).astype(np.float32)}
    (plain,) = run(session, feeds, io_binding=False)
    (bound,) = run(session, feeds, io_binding=True)
    np.testing.assert_array_equal(plain, bound)
    assert not on_cuda(session)


def test_cpu_is_always_the_last_resort() -> None:
    assert requested_providers("cpu") == [CPU]
    assert requested_providers("cuda")[-1] == CPU
    assert requested_providers("auto")[-1] == CPU


def test_cuda_without_a_cuda_provider_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with pytest.raises(DeviceUnavailable, match="onnxruntime-gpu"):
        check_device(Settings(device="cuda"))
    check_device(Settings(device="cuda", cuda_fallback=True))  # allowed: a warning
    check_device(Settings(device="auto"))
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.raises(DeviceUnavailable, match="ONNX Runtime opened the graph on"):  # listed, but not used
        check_device(Settings(device="cuda"))


REAL_CUDA = CUDA in ort.get_available_providers()


@pytest.mark.skipif(REAL_CUDA, reason="CUDA really is available here (bench/gpu.sh)")
def test_a_session_that_falls_back_from_cuda_fails_its_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA listed but unusable (no driver, missing libraries): ONNX Runtime quietly runs on the CPU."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.raises(DeviceUnavailable, match="asked for CUDAExecutionProvider"):
        create_session(VIT, Settings(device="cuda"))
    assert create_session(VIT, Settings(device="cuda", cuda_fallback=True)).get_providers() == [CPU]


def test_cuda_options_take_any_json_value() -> None:
    settings = Settings.model_validate({"cuda_options": {"device_id": 1, "gpu_mem_limit": 2**33, "x": True}})
    assert provider_options(settings.cuda_options) == {"device_id": "1", "gpu_mem_limit": "8589934592", "x": "1"}


@pytest.mark.skipif(REAL_CUDA, reason="CUDA really is available here (bench/gpu.sh)")
def test_python_m_service_exits_2_when_cuda_is_missing() -> None:
    env = {**os.environ, "VITSERVE_DEVICE": "cuda"}
    done = subprocess.run([sys.executable, "-m", "service", "--port", "1"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 2 and b"onnxruntime-gpu" in done.stderr
