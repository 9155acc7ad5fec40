"""What loading a graph measured on this host (whether a run is long enough to keep every core, and
a heavy graph's batch knee), remembered so that the next start on the same host loads without its
timing runs: they cost a heavy model a session made twice or seconds of runs at several batch sizes.

Kept as one JSON file per version's graph in `<model_repository>/.measured/`, valid while what the
figures depend on is unchanged: the version's files (their fingerprint), the CPU, the cores ONNX
Runtime gets, its version. A repository the service cannot write to keeps nothing (each start then
measures, as without it); delete the folder to measure again."""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import onnxruntime as ort

log = logging.getLogger("service")

FOLDER = ".measured"


@dataclass(frozen=True)
class Measured:
    heavy: bool  # a one-image run long enough that ONNX Runtime keeps every core
    knee: int | None = None  # a heavy graph's largest batch worth forming (None: not measured)
    rates: dict[int, float] = field(default_factory=dict)  # images/s by batch size, as measured


@cache
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_key(fingerprint: str, threads: int) -> dict[str, Any]:
    """What the figures hold for: the same files on the same kind of CPU with as many threads."""
    return {"fingerprint": fingerprint, "cpu": cpu_name(), "threads": threads, "onnxruntime": ort.__version__}


def path_of(repository: Path, model: str, version: int, graph: str) -> Path:
    return repository / FOLDER / f"{model}.{version}.{graph}.json"


def recall(path: Path, key: dict[str, Any]) -> Measured | None:
    """The figures kept for `key`, or None (none kept, another host's or files', unreadable)."""
    try:
        kept = json.loads(path.read_text())
        if kept["key"] != key:
            return None
        rates = {int(size): float(rate) for size, rate in kept["rates"].items()}
        knee = kept["knee"]
        return Measured(bool(kept["heavy"]), None if knee is None else int(knee), rates)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def remember(path: Path, key: dict[str, Any], measured: Measured) -> None:
    """Keeps the figures for the next start; a repository that cannot be written keeps nothing."""
    try:
        path.parent.mkdir(exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")  # renamed in whole: no half-written file
        partial.write_text(json.dumps({"key": key, **asdict(measured)}))
        partial.replace(path)
    except OSError as exc:
        log.debug("could not keep what loading measured in %s: %s", path, exc)
