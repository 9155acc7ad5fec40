"""TensorRT and CUDA graphs as options: the providers asked for and the option strings built for a
manifest's graphs and the batch policy's sizes (pure functions, run on the CPU), refusal where
TensorRT is asked and missing, and the fixed-buffer binding CUDA graphs need, on the CPU provider."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from service import runtime
from service.manifest import read_manifest
from service.repository import warm_sizes
from service.runtime import (
    CPU,
    CUDA,
    TENSORRT,
    DeviceUnavailable,
    check_device,
    create_session,
    cuda_options,
    profile_shapes,
    requested_providers,
    session_provider_options,
    tensorrt_options,
    trt_cache_dir,
)
from service.settings import PROJECT_ROOT, Settings

SHIPPED = PROJECT_ROOT / "model_repository"
VIT = read_manifest(SHIPPED / "vit" / "1")
GENERATOR = read_manifest(SHIPPED / "imagetransformer" / "1")


@pytest.fixture
def gpu_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])


@pytest.mark.usefixtures("gpu_build")
def test_tensorrt_comes_first_then_cuda_then_cpu() -> None:
    assert requested_providers("auto", tensorrt=True) == [TENSORRT, CUDA, CPU]
    assert requested_providers("cuda", tensorrt=True) == [TENSORRT, CUDA, CPU]
    assert requested_providers("cuda") == [CUDA, CPU]
    assert requested_providers("cpu", tensorrt=True) == [CPU]


def test_tensorrt_is_not_asked_for_where_onnxruntime_lacks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    assert requested_providers("cuda", tensorrt=True) == [CUDA, CPU]


def test_profiles_span_the_warmed_batch_sizes_of_every_batched_input() -> None:
    sizes = warm_sizes(VIT.serving)  # 1, 2, 4, ..., 32
    options = tensorrt_options(VIT.main, sizes, Path("/cache"), fp16=False, largest=VIT.serving.max_queue_size)
    assert options["trt_profile_min_shapes"] == "pixel_values:1x1x32x32"
    assert options["trt_profile_opt_shapes"] == "pixel_values:32x1x32x32"  # tuned for a full batch
    assert options["trt_profile_max_shapes"] == "pixel_values:256x1x32x32"  # valid for any run the queue allows
    assert options["trt_engine_cache_enable"] == "1" and options["trt_engine_cache_path"] == "/cache"
    assert options["trt_timing_cache_enable"] == "1" and options["trt_fp16_enable"] == "0"
    step = tensorrt_options(GENERATOR.graphs["step"], [1, 2, 4], Path("/cache"), fp16=True)
    low = step["trt_profile_min_shapes"].split(",")
    assert low[:4] == ["previous:1", "position:1", "labels:1", "past_key_values.0.key:1x4x24x16"]
    assert len(low) == 3 + 2 * GENERATOR.config["layers"]
    assert step["trt_profile_max_shapes"].startswith("previous:4,position:4,labels:4,past_key_values.0.key:4x4x24x16")
    assert step["trt_fp16_enable"] == "1"


def test_no_profile_without_a_batch_axis_or_with_axes_of_unknown_size() -> None:
    fixed = VIT.main.model_copy(update={"inputs": [VIT.main.inputs[0].model_copy(update={"shape": [1, 1, 32, 32]})]})
    assert profile_shapes(fixed, 8) == ""
    assert "trt_profile_min_shapes" not in tensorrt_options(fixed, [1, 8], Path("/c"), fp16=False)
    free = VIT.main.model_copy(
        update={"inputs": [VIT.main.inputs[0].model_copy(update={"shape": ["batch", 1, "height", "width"]})]}
    )
    assert "trt_profile_min_shapes" not in tensorrt_options(free, [1, 8], Path("/c"), fp16=False)


@pytest.mark.usefixtures("gpu_build")
def test_the_cache_lives_under_the_repository_per_model_version(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path, tensorrt=True, trt_fp16=True)
    path = tmp_path / "vit" / "3" / "model.onnx"
    assert trt_cache_dir(settings, path) == tmp_path / ".trt_cache" / "vit" / "3"
    assert trt_cache_dir(settings.model_copy(update={"trt_cache_dir": Path("/x")}), path) == Path("/x/vit/3")
    trt, cuda, cpu = session_provider_options([TENSORRT, CUDA, CPU], path, settings, VIT.main, [1, 32], fp16=False)
    assert trt["trt_fp16_enable"] == "1"  # the setting, for a float32 model
    assert trt["device_id"] == cuda["device_id"]  # TensorRT on CUDA's GPU
    assert (tmp_path / ".trt_cache" / "vit" / "3").is_dir() and cuda["device_id"] == "0" and cpu == {}


def test_cuda_graphs_where_only_the_batch_and_a_pool_vary(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(cuda_graphs=True)
    for spec in (VIT.main, GENERATOR.graphs["step"], GENERATOR.graphs["pooled_step"]):  # batches are padded
        assert cuda_options(settings, spec, Path("model.onnx"))["enable_cuda_graph"] == "1"
    assert "enable_cuda_graph" not in cuda_options(Settings(), VIT.main, Path("model.onnx"))
    image = VIT.main.inputs[0].model_copy(update={"shape": ["batch", 3, "height", "width"]})  # an imported DETR's
    free = VIT.main.model_copy(update={"inputs": [image]})
    assert "enable_cuda_graph" not in cuda_options(settings, free, Path("model.onnx"))
    assert "no CUDA graphs, it has axes other than the batch" in caplog.text


def test_tensorrt_asked_and_missing_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(runtime, "probe", lambda providers, options: None)  # CUDA works
    with pytest.raises(DeviceUnavailable, match="TensorrtExecutionProvider"):
        check_device(Settings(device="cuda", tensorrt=True))
    with pytest.raises(DeviceUnavailable, match="VITSERVE_TENSORRT=true"):
        check_device(Settings(device="auto", tensorrt=True))
    serving = check_device(Settings(device="cuda", tensorrt=True, cuda_fallback=True))  # allowed: a warning
    assert (serving.device, serving.tensorrt) == ("cuda", False)
    check_device(Settings(device="cpu", tensorrt=True))  # the CPU asked for: TensorRT does not apply
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])
    check_device(Settings(device="cuda", tensorrt=True))


REAL_TENSORRT = TENSORRT in ort.get_available_providers()


@pytest.mark.skipif(REAL_TENSORRT, reason="TensorRT really is available here")
def test_python_m_service_exits_2_when_tensorrt_is_missing() -> None:
    env = {**os.environ, "VITSERVE_TENSORRT": "true"}
    done = subprocess.run([sys.executable, "-m", "service", "--port", "1"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 2 and b"TensorrtExecutionProvider" in done.stderr


@pytest.mark.skipif(REAL_TENSORRT, reason="TensorRT really is available here")
def test_a_session_that_falls_back_from_tensorrt_fails_its_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT listed but unusable: ONNX Runtime quietly runs on the next provider."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])
    path = SHIPPED / "vit" / "1" / "model.onnx"
    settings = Settings(device="cuda", tensorrt=True, trt_cache_dir=Path("/tmp/vitserve-trt-test"))
    with pytest.raises(DeviceUnavailable, match="asked for TensorrtExecutionProvider"):
        create_session(path, settings, VIT.main, [1, 32])


def test_each_graph_is_given_its_warmed_sizes_and_the_largest_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.repository as repository
    from service.tasks import TASKS, manifest_checks

    seen: dict[str, tuple[list[int], bool, int]] = {}
    real = repository.create_session

    def spy(
        path: Path, settings: Settings, spec: object, sizes: list[int], fp16: bool, largest: int, threads: int = 0,
        spin_us: int = 0,
    ) -> object:  # fmt: skip
        seen[path.name] = (list(sizes), fp16, largest)
        return real(path, settings, spec, sizes, fp16, largest, threads, spin_us)  # type: ignore[arg-type]

    monkeypatch.setattr(repository, "create_session", spy)
    settings = Settings(device="cpu", warmup=False, lazy_attention=False)
    model = repository.load_model(SHIPPED / "vit", settings, manifest_checks(TASKS))
    assert model.state == "ready", model.reason
    assert seen["model.onnx"] == ([1, 2, 4, 8, 16, 32], False, 256)
    assert seen["attention.onnx"] == ([1], False, 256)  # on request only: warmed once
