"""What a peer benchmark's tables name: the machine, and each server's framework and runtime pins."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.common import machine
from bench.peers import venvs
from bench.peers.servers import SERVERS


def describe_machine() -> dict[str, Any]:
    """bench.common.machine() and the CPU's model name, so a table names the machine it came from."""
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "")
    return {**machine(), "cpu": cpu}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def versions(names: list[str]) -> dict[str, str]:
    """Each server's framework and runtime pins (its requirements file; the project venv for the service)."""
    keys = ("fastapi", "uvicorn", "litserve", "nvidia-pytriton", "onnxruntime", "numpy", "pillow")
    found = {"service": _pins("fastapi", "uvicorn", "onnxruntime", "numpy", "pillow")}
    for name in names:
        if name == "transformers":
            found[name] = _pins("fastapi", "uvicorn", "torch", "transformers", "numpy", "pillow")
        elif SERVERS[name].venv:
            pins = (venvs.REQUIREMENTS / f"{SERVERS[name].venv}.txt").read_text().splitlines()
            found[name] = ", ".join(p for p in pins if p.split("==")[0].lower() in keys)
    return found


def finite(value: Any) -> Any:
    """NaN (a figure that could not be had) as null, so the JSON stays strict."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and value != value else value


def _pins(*packages: str) -> str:
    """The project venv's versions of these packages."""
    return ", ".join(f"{p}=={version(p)}" for p in packages)
