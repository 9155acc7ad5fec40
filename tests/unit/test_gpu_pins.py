"""Every pin of pyproject.toml exists for the Pythons and platforms the project runs on, and the GPU
pins agree with each other and with the GPU image: read off PyPI's index and the wheels themselves
(a few ranges of each file, never a whole wheel), so a pin that does not exist fails CI."""

from __future__ import annotations

import io
import json
import re
import tomllib
import urllib.request
import zipfile
from functools import cache

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from service.settings import PROJECT_ROOT

INDEX = "https://pypi.org/simple"
PROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
DOCKERFILE = (PROJECT_ROOT / "Dockerfile").read_text()
PYTHONS = [(3, 11), (3, 12)]  # the CPU image's and the GPU image's (Ubuntu 24.04)
# manylinux up to glibc 2.35 (both images have newer), with the old aliases NVIDIA's CUDA wheels still carry
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(35, 4, -1)] + [
    f"manylinux{alias}_x86_64" for alias in ("2014", "2010", "1")
]


def target_tags(python: tuple[int, int]) -> set[Tag]:
    return {*cpython_tags(python, platforms=PLATFORMS), *compatible_tags(python, platforms=PLATFORMS)}


def get(url: str, headers: dict[str, str] | None = None) -> bytes:
    for attempt in range(3):  # a registry's hiccup is not a missing pin
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as answer:
                return answer.read()  # type: ignore[no-any-return]
        except OSError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@cache
def files(name: str) -> list[dict[str, object]]:
    """The project's files on PyPI (the JSON simple API, PEP 691)."""
    page = get(f"{INDEX}/{canonicalize_name(name)}/", {"Accept": "application/vnd.pypi.simple.v1+json"})
    return [f for f in json.loads(page)["files"] if not f.get("yanked")]


def wheels(name: str, version: Version, python: tuple[int, int]) -> list[str]:
    """URLs of the release's wheels that install on `python` on x86_64 Linux."""
    tags = target_tags(python)
    found = []
    for f in files(name):
        filename = str(f["filename"])
        if filename.endswith(".whl"):
            _, wheel_version, _, wheel_tags = parse_wheel_filename(filename)
            if wheel_version == version and wheel_tags & tags:
                found.append(str(f["url"]))
    return found


def sdist_only(name: str, version: Version) -> bool:
    """A release with no wheel at all, only a source archive (NVIDIA's stubs that fetch their wheel)."""
    ours = [str(f["filename"]) for f in files(name) if f"-{version}." in str(f["filename"])]
    return bool(ours) and not any(n.endswith(".whl") for n in ours)


class HttpFile(io.RawIOBase):
    """A remote file read in ranges: zipfile reads a wheel's directory and one member, not the wheel."""

    def __init__(self, url: str) -> None:
        self.url, self.position = url, 0
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as answer:
            self.size = int(answer.headers["Content-Length"])

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = (offset, self.position + offset, self.size + offset)[whence]
        return self.position

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        end = min(self.position + len(buffer), self.size)
        if end <= self.position:
            return 0
        data = get(self.url, {"Range": f"bytes={self.position}-{end - 1}"})
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


@cache
def wheel_member(url: str, suffix: str) -> bytes:
    with zipfile.ZipFile(io.BufferedReader(HttpFile(url), 1 << 18)) as wheel:
        (name,) = [n for n in wheel.namelist() if n.endswith(suffix)]
        return wheel.read(name)


def pins() -> list[Requirement]:
    every = [*PROJECT["dependencies"], *(r for extra in EXTRAS.values() for r in extra)]
    return [Requirement(r) for r in every]


def pinned(requirement: Requirement) -> Version:
    (spec,) = requirement.specifier
    assert spec.operator == "==", f"{requirement} is not an exact pin"
    return Version(spec.version)


@pytest.mark.parametrize("requirement", pins(), ids=str)
def test_the_pin_exists_for_python_3_11_and_3_12_on_linux(requirement: Requirement) -> None:
    version = pinned(requirement)
    if sdist_only(requirement.name, version):
        return  # installs by building (TensorRT's stub fetches NVIDIA's wheel): it exists
    for python in PYTHONS:
        assert wheels(requirement.name, version, python), f"no {requirement} wheel for Python {python} on x86_64 Linux"


def gpu_wheel() -> tuple[Requirement, str]:
    (requirement,) = [Requirement(r) for r in EXTRAS["gpu"]]
    found = wheels(requirement.name, pinned(requirement), (3, 12))
    assert found, f"no {requirement} wheel for Python 3.12 on x86_64 Linux"
    return requirement, found[0]


def test_the_gpu_extras_libraries_exist_for_the_wheels_cuda() -> None:
    """The extras named on the pin ([cuda,cudnn]) exist, and each library they pull has a release
    that installs on both Pythons (pip would skip an unknown extra with only a warning)."""
    requirement, url = gpu_wheel()
    metadata = wheel_member(url, ".dist-info/METADATA").decode()
    offered = set(re.findall(r"^Provides-Extra: (\S+)$", metadata, re.M))
    assert requirement.extras and requirement.extras <= offered, (requirement.extras, offered)
    needs = [Requirement(line) for line in re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)]
    pulled = [r for r in needs if r.marker and any(r.marker.evaluate({"extra": e}) for e in requirement.extras)]
    assert pulled
    for library in pulled:
        releases = {parse_wheel_filename(str(f["filename"]))[1] for f in files(library.name)
                    if str(f["filename"]).endswith(".whl")}  # fmt: skip
        newest = max(v for v in releases if v in SpecifierSet(str(library.specifier)))
        for python in PYTHONS:
            assert wheels(library.name, newest, python), f"{library} {newest}: no wheel for {python}"


def built_for_cuda() -> str:
    """The CUDA version the pinned onnxruntime-gpu wheel records (onnxruntime/capi/build_and_package_info.py)."""
    _, url = gpu_wheel()
    info = wheel_member(url, "onnxruntime/capi/build_and_package_info.py").decode()
    return re.search(r"cuda_version = '([\d.]+)'", info).group(1)  # type: ignore[union-attr]


def test_the_gpu_image_and_the_cuda_wheels_are_the_cuda_major_the_wheel_was_built_for() -> None:
    major = built_for_cuda().split(".")[0]
    image = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-", DOCKERFILE, re.M)
    assert image, "the Dockerfile's ARG CUDA_IMAGE names no nvidia/cuda:X.Y.Z-cudnn-runtime-... image"
    assert image.group(1) == major, f"the wheel is built for CUDA {major}, the image is CUDA {image.group(1)}"
    requirement, url = gpu_wheel()
    metadata = wheel_member(url, ".dist-info/METADATA").decode()
    runtime = re.search(r"^Requires-Dist: nvidia-cuda-runtime~=(\d+)\.", metadata, re.M)
    assert runtime and runtime.group(1) == major


def test_tensorrt_is_the_major_version_the_tensorrt_provider_links() -> None:
    _, url = gpu_wheel()
    provider = wheel_member(url, "capi/libonnxruntime_providers_tensorrt.so")
    linked = set(re.findall(rb"libnvinfer\.so\.(\d+)", provider))
    (requirement,) = [Requirement(r) for r in EXTRAS["tensorrt"]]
    assert linked == {str(pinned(requirement).major).encode()}, (linked, requirement)
    assert requirement.name.startswith(f"tensorrt-cu{built_for_cuda().split('.')[0]}")
