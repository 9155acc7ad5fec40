"""The container files agree with the project: versions come from pyproject.toml only."""

from __future__ import annotations

import re
import tomllib

from service.settings import PROJECT_ROOT

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
DOCKERFILE = (PROJECT_ROOT / "Dockerfile").read_text()


def pins(requirements: list[str]) -> dict[str, str]:
    return dict(re.match(r"([\w.-]+)(?:\[[\w,]+\])?==([\w.+]+)$", r).groups() for r in requirements)  # type: ignore[union-attr,misc]


def test_the_dockerfile_pins_no_python_package_itself() -> None:
    installs = re.findall(r"pip install[^\n]*", DOCKERFILE)
    assert installs and not any("==" in line for line in installs), installs


def test_the_gpu_runtime_is_the_same_onnxruntime_release_and_only_an_extra_brings_one() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    cpu, gpu = pins(extras["cpu"]), pins(extras["gpu"])
    assert gpu == {"onnxruntime-gpu": cpu["onnxruntime"]}
    # both install the module onnxruntime: no other requirement may bring either
    others = [r for name, extra in extras.items() if name not in ("cpu", "gpu") for r in extra]
    assert not any(r.startswith("onnxruntime") for r in [*PYPROJECT["project"]["dependencies"], *others])
    # the GPU image installs exactly that requirement, read from pyproject at build time (its CUDA
    # libraries come with the image, not with the extra's [cuda,cudnn] wheels)
    assert '["optional-dependencies"]["gpu"][0]' in DOCKERFILE and '".[cpu]"' in DOCKERFILE


def test_images_run_the_service_without_torch_and_not_as_root() -> None:
    for target in ("cpu", "gpu"):
        stage = DOCKERFILE.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert "USER 10001" in stage and "HEALTHCHECK" in stage and "/health/ready" in stage
        assert "torch" not in stage and "model_repository" in stage
