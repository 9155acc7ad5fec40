"""A GPU provider that ONNX Runtime lists but that throws at start-up (no visible GPU, a driver too
old for CUDA 13, a missing library): faked here on the CPU build. The check at start runs the probe
graph and says why; models fall back to the CPU only where that is allowed, and say so."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service import runtime
from service.repository import load_model
from service.runtime import CPU, CUDA, PROBE, TENSORRT, DeviceUnavailable, check_device, create_session, probe
from service.settings import Settings
from service.tasks import TASKS, manifest_checks
from tests.conftest import SHIPPED_REPOSITORY, client_for

VIT = SHIPPED_REPOSITORY / "vit" / "1" / "model.onnx"
REASON = "CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version ; GPU=0"
REAL_SESSION = ort.InferenceSession

# Faked in a child process too (python -m service): ONNX Runtime lists the GPU providers, and a session
# that asks for a broken one first throws as the real one does where the driver is too old; one that
# asks for a working one runs on the CPU but says it runs there (enough for the probe, not for serving).
FAKE = f"""
import onnxruntime as ort
real = ort.InferenceSession
BROKEN = ("{CUDA}", "{TENSORRT}")
def broken(path, options=None, providers=None, provider_options=None, **kwargs):
    assert kwargs.get("enable_fallback") == 0, "ONNX Runtime's own fallback must be off"
    if providers and providers[0] in BROKEN:
        raise RuntimeError({REASON!r})
    session = real(path, options, providers=["{CPU}"], **kwargs)
    if providers and providers[0] != "{CPU}":
        session.get_providers = lambda: providers
    return session
ort.InferenceSession = broken
ort.get_available_providers = lambda: ["{TENSORRT}", "{CUDA}", "{CPU}"]
"""


def fake_gpu(broken: tuple[str, ...]) -> Iterator[None]:
    saved = ort.InferenceSession, ort.get_available_providers
    exec(FAKE.replace(f'BROKEN = ("{CUDA}", "{TENSORRT}")', f"BROKEN = {broken!r}"), {})
    yield
    ort.InferenceSession, ort.get_available_providers = saved


@pytest.fixture
def broken_gpu() -> Iterator[None]:
    yield from fake_gpu((CUDA, TENSORRT))


@pytest.fixture
def broken_tensorrt() -> Iterator[None]:
    yield from fake_gpu((TENSORRT,))


def test_the_probe_runs_on_the_cpu_and_proves_its_answer() -> None:
    assert probe([CPU], [{}]) is None
    assert PROBE.stat().st_size < 1000


@pytest.mark.usefixtures("broken_gpu")
def test_the_probe_gives_onnx_runtimes_reason() -> None:
    assert probe([CUDA, CPU], [{}, {}]) == REASON


@pytest.mark.usefixtures("broken_gpu")
def test_device_cuda_refuses_to_start_with_the_reason() -> None:
    with pytest.raises(DeviceUnavailable, match="driver version is insufficient") as refused:
        check_device(Settings(device="cuda"))
    assert "driver of 580 or later" in str(refused.value) and "VITSERVE_CUDA_FALLBACK" in str(refused.value)


@pytest.mark.usefixtures("broken_gpu")
@pytest.mark.parametrize("settings", [Settings(device="auto"), Settings(device="cuda", cuda_fallback=True)])
def test_where_the_cpu_is_allowed_the_service_serves_on_it_and_logs_why(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "service"):
        serving = check_device(settings)
    assert serving.device == "cpu" and REASON in caplog.text and "serving without CUDAExecutionProvider" in caplog.text


@pytest.mark.usefixtures("broken_tensorrt")
def test_tensorrt_that_throws_refuses_to_start_unless_falling_back_is_allowed(caplog: pytest.LogCaptureFixture) -> None:
    for device in ("cuda", "auto"):  # TensorRT is asked for by name: auto does not excuse it
        with pytest.raises(DeviceUnavailable, match=f"TENSORRT=true, but {TENSORRT} cannot run: {REASON}"):
            check_device(Settings(device=device, tensorrt=True))  # type: ignore[arg-type]
    serving = check_device(Settings(device="cuda", tensorrt=True, cuda_fallback=True))
    assert (serving.device, serving.tensorrt) == ("cuda", False) and REASON in caplog.text


@pytest.mark.usefixtures("broken_gpu")
def test_without_cuda_auto_serves_on_the_cpu_tensorrt_or_not() -> None:
    with pytest.raises(DeviceUnavailable, match=f"{CUDA} cannot run"):
        check_device(Settings(device="cuda", tensorrt=True))
    serving = check_device(Settings(device="auto", tensorrt=True))
    assert (serving.device, serving.tensorrt) == ("cpu", False)


@pytest.mark.usefixtures("broken_gpu")
def test_a_session_retries_on_the_cpu_itself_only_where_allowed(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(DeviceUnavailable, match=f"asked for {CUDA}, runs on {CPU}: .*driver version is insufficient"):
        create_session(VIT, Settings(device="cuda"))
    for settings in (Settings(device="auto"), Settings(device="cuda", cuda_fallback=True, tensorrt=True)):
        caplog.clear()
        session = create_session(VIT, settings, threads=1)
        assert session.get_providers() == [CPU]
        assert REASON in caplog.text
        (logits,) = session.run(None, {"pixel_values": np.zeros((1, 1, 32, 32), np.float32)})
        assert logits.shape == (1, 10)


@pytest.mark.usefixtures("broken_gpu")
def test_a_broken_model_file_is_the_models_fault_not_the_devices(tmp_path: Path) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not an onnx graph")
    with pytest.raises(Exception) as raised:
        create_session(broken, Settings(device="cuda"))
    assert not isinstance(raised.value, DeviceUnavailable) and "driver" not in str(raised.value)


@pytest.mark.usefixtures("broken_gpu")
def test_the_model_fails_with_the_reason_where_cuda_is_demanded() -> None:
    model = load_model(SHIPPED_REPOSITORY / "vit", Settings(device="cuda", warmup=False), manifest_checks(TASKS))
    assert model.state == "failed" and "driver version is insufficient" in (model.reason or "")


@pytest.mark.usefixtures("broken_gpu")
def test_the_service_under_auto_serves_every_model_on_the_cpu_and_says_so() -> None:
    for client in client_for(Settings(model_repository=SHIPPED_REPOSITORY, device="auto")):
        assert client.get("/health/ready").status_code == 200
        models = client.get("/v1/models").json()["models"]
        assert models and all(m["providers"] == [CPU] for m in models)
        assert client.app.state.settings.device == "cpu"  # type: ignore[attr-defined]


def test_python_m_service_exits_2_with_onnx_runtimes_reason() -> None:
    start = FAKE + "\nfrom service.__main__ import main\nmain(['--port', '1'])\n"
    env = {"VITSERVE_DEVICE": "cuda", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", start], env=env, capture_output=True, timeout=60, text=True)
    assert done.returncode == 2, done.stderr
    assert "driver version is insufficient" in done.stderr and "CUDAExecutionProvider cannot run" in done.stderr


def test_without_a_gpu_build_device_auto_is_the_cpu_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    assert check_device(Settings(device="auto")) == Settings(device="auto")
    monkeypatch.setattr(runtime, "probe", lambda providers, options: None)  # a GPU that works
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    assert check_device(Settings(device="cuda")).device == "cuda"


def test_onnx_runtimes_logged_reason_is_read_off_its_log() -> None:
    """What onnxruntime-gpu 1.31.1 wrote on this machine (no driver) when it skipped CUDA."""
    log = (
        "\x1b[0;93m2026-12-06 21:29:28.16 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:856 operator()] No "
        "registered plugin EP device found for 'CUDAExecutionProvider' with device_id=0\x1b[m\n\x1b[1;31m2026-12-06 "
        "21:29:28.16 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] /onnxruntime_src/onnxruntime/"
        "core/session/provider_bridge_ort.cc:2043 onnxruntime::Provider& onnxruntime::ProviderLibrary::Get() "
        "[ONNXRuntimeError] : 1 : FAIL : Failed to load library /venv/onnxruntime/capi/libonnxruntime_providers_cuda"
        ".so with error: libcuda.so.1: cannot open shared object file: No such file or directory\n\x1b[m\n"
    )
    assert runtime.messages(log) == [
        "No registered plugin EP device found for 'CUDAExecutionProvider' with device_id=0",
        "Failed to load library /venv/onnxruntime/capi/libonnxruntime_providers_cuda.so with error: libcuda.so.1: "
        "cannot open shared object file: No such file or directory",
    ]
