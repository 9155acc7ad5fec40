"""Model-independent export steps: trace to ONNX, run under ONNX Runtime, check parity, publish."""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from service.manifest import TASK_CHECKS, GraphSpec, Manifest, OutputParity, Parity, Preprocessing, write_manifest
from service.repository import load_model
from service.settings import Settings

OPSET = 18
TRACED_BATCH = 2  # the batch size traced at export; parity runs at another one
PARITY_BATCH = 37
PARITY_TOLERANCE = 1e-4
# no output's tolerance widens beyond this, whatever PyTorch's own float32 error
PARITY_CAP = 1e-3


BATCH = torch.export.Dim("batch", min=1, max=4096)


class ExportError(RuntimeError):
    """The artifact failed a check and was not written."""


def to_onnx(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic_shapes: dict[str, Any] | None = None,
) -> None:
    """Export with `dynamic_shapes` (default: axis 0 of every input is the dynamic batch)."""
    if dynamic_shapes is None:
        dynamic_shapes = {name: {0: BATCH} for name in inputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    onnx.checker.check_model(str(path), full_check=True)


def run_batched(session: ort.InferenceSession, name: str, inputs: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Every output of `session` over `inputs`, run in chunks of `batch_size`."""
    chunks = [session.run(None, {name: inputs[i : i + batch_size]}) for i in range(0, len(inputs), batch_size)]
    return [np.concatenate(outputs) for outputs in zip(*chunks, strict=True)]


def export_image_graph(module: torch.nn.Module, inputs: np.ndarray, folder: Path, spec: GraphSpec) -> list[np.ndarray]:
    """Trace `module` (one image batch in, `spec.outputs` out) to `folder/spec.file`, and run the
    ONNX graph over `inputs` in chunks of PARITY_BATCH (not the traced size)."""
    session = trace_image_graph(module, inputs, folder, spec)
    return run_batched(session, spec.inputs[0].name, inputs, PARITY_BATCH)


def trace_image_graph(
    module: torch.nn.Module, inputs: np.ndarray, folder: Path, spec: GraphSpec
) -> ort.InferenceSession:
    """Trace `module` (one image batch in, `spec.outputs` out) to `folder/spec.file`, opened in ONNX Runtime."""
    names = [t.name for t in spec.inputs]
    to_onnx(
        module, (torch.from_numpy(inputs[:TRACED_BATCH]),), folder / spec.file, names, [t.name for t in spec.outputs]
    )
    return ort.InferenceSession(str(folder / spec.file), providers=["CPUExecutionProvider"])


# What the arrays of one parity chunk may hold: an output's float64 reference for so many images.
# A real-size model's attention is large (a ViT-L/16 at 384 pixels: 0.5 GB an image in float32), and
# every array of a run is kept four times (ONNX Runtime's, PyTorch's float32 and float64).
PARITY_CHUNK_BYTES = 1 << 30


def images_within(spec: GraphSpec, budget: int) -> int:
    """How many images' largest output (float32, its fixed axes) fit in `budget` bytes, at least one."""
    largest = max(math.prod(d for d in t.shape[1:] if isinstance(d, int)) for t in spec.outputs)
    return max(1, budget // (4 * largest))


def parity_chunk(spec: GraphSpec) -> int:
    """Images per parity run for a graph of fixed shapes: PARITY_BATCH, or fewer where its outputs are
    large (held in float64 too), but never the traced batch size (another size checks the batch axis)."""
    return min(PARITY_BATCH, max(TRACED_BATCH + 1, images_within(spec, PARITY_CHUNK_BYTES // 2)))


@torch.no_grad()
def torch_outputs(
    module: torch.nn.Module, *inputs: np.ndarray, batch_size: int = 64, double: bool = False
) -> list[np.ndarray]:
    """The PyTorch reference: every output of `module` over `inputs` (split along axis 0); with
    `double`, of a float64 copy of it on the same inputs widened to float64."""
    if double:
        module = copy.deepcopy(module).double()
    module.eval()
    chunks = []
    for i in range(0, len(inputs[0]), batch_size):
        feed = [torch.from_numpy(x[i : i + batch_size]) for x in inputs]
        out = module(*(t.double() if double and t.is_floating_point() else t for t in feed))
        chunks.append([t.numpy() for t in (out if isinstance(out, tuple) else (out,))])
    return [np.concatenate(outputs) for outputs in zip(*chunks, strict=True)]


@dataclass
class Compared:
    """One output: ONNX Runtime's answer beside PyTorch's in float32 and in float64."""

    name: str
    onnx: np.ndarray
    float32: np.ndarray
    float64: np.ndarray


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def output_parity(c: Compared) -> OutputParity:
    """Tolerance max(1e-4, twice PyTorch's own float32 error on this output), never above the cap."""
    error = max_diff(c.float32, c.float64)
    return OutputParity(
        name=c.name,
        max_abs_diff=max_diff(c.onnx, c.float32),
        tolerance=min(PARITY_CAP, max(PARITY_TOLERANCE, 2 * error)),
        float32_error=error,
        onnx_float64_error=max_diff(c.onnx, c.float64),
    )


def worst(parts: Sequence[OutputParity]) -> OutputParity:
    """One output measured in parts (an image or a layer at a time): each figure the largest of the
    parts', the same as measured over the whole at once (the tolerance grows with the error)."""
    fields = ("max_abs_diff", "tolerance", "float32_error", "onnx_float64_error")
    return OutputParity(name=parts[0].name, **{f: max(getattr(p, f) for p in parts) for f in fields})


class ParityRuns:
    """Outputs compared run by run, each run's arrays freed after it (a real-size model's attention
    over a few images is gigabytes): the figures of one comparison of them all (worst). The first
    output is the logits, whose argmax must not change in any run."""

    def __init__(self, names: Sequence[str]) -> None:
        self.runs: dict[str, list[OutputParity]] = {name: [] for name in names}
        self.argmax_equal = True

    def add(self, compared: Compared) -> None:
        self.runs[compared.name].append(output_parity(compared))
        if compared.name == next(iter(self.runs)):
            self.argmax_equal &= bool((compared.float32.argmax(-1) == compared.onnx.argmax(-1)).all())

    def add_part(self, compared: Compared) -> None:
        """A part of an output (a layer of its attention, say): measured, never an argmax."""
        self.runs[compared.name].append(output_parity(compared))

    def parity(self, batch_size: int) -> Parity:
        return parity_of([worst(runs) for runs in self.runs.values()], batch_size, self.argmax_equal)


def check_parity(compared: Sequence[Compared], batch_size: int) -> Parity:
    """Every output measured on its own; the first is the logits, whose argmax must not change."""
    logits = compared[0]
    argmax_equal = bool((logits.float32.argmax(-1) == logits.onnx.argmax(-1)).all())
    return parity_of([output_parity(c) for c in compared], batch_size, argmax_equal)


def parity_of(outputs: Sequence[OutputParity], batch_size: int, argmax_equal: bool) -> Parity:
    """The outputs' figures, those of the one closest to its tolerance on top."""
    binding = max(outputs, key=lambda o: o.max_abs_diff / o.tolerance)
    return Parity(
        max_abs_diff=binding.max_abs_diff,
        tolerance=binding.tolerance,
        float32_error=binding.float32_error,
        batch_size=batch_size,
        traced_batch_size=TRACED_BATCH,
        argmax_equal=argmax_equal,
        cap=PARITY_CAP,
        outputs=list(outputs),
    )


def require_parity(parity: Parity) -> None:
    failed = [o for o in parity.outputs if not o.max_abs_diff <= o.tolerance]
    if failed or not parity.argmax_equal:
        worst = ", ".join(f"{o.name} {o.max_abs_diff:.3g} (tolerance {o.tolerance:.3g})" for o in failed)
        raise ExportError(
            f"ONNX parity failed at batch {parity.batch_size}: max abs diff {worst or 'within tolerance'}, "
            f"argmax equal: {parity.argmax_equal}; nothing was written"
        )


def manifest_for(
    checkpoint: dict[str, Any],
    *,
    name: str,
    version: int,
    task: str,
    architecture: str,
    graphs: dict[str, GraphSpec],
    preprocessing: Preprocessing,
    quality: dict[str, float],
    parity: Parity,
) -> Manifest:
    """The manifest of an exported checkpoint: what it is, what it learned from, how good it is."""
    return Manifest(
        name=name,
        version=version,
        task=task,
        architecture=architecture,
        graphs=graphs,
        preprocessing=preprocessing,
        labels=checkpoint["labels"],
        data={**checkpoint["data"], "source": checkpoint["source"]},
        quality={**checkpoint["quality"], **quality},
        parity=parity,
        opset=OPSET,
        versions=library_versions(),
        # not the wall-clock seconds: the same command gives the same manifest
        training={**without(checkpoint["training"], "seconds"), **checkpoint["train_config"]},
        config=checkpoint["config"],
    )


def without(fields: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k != key}


def library_versions() -> dict[str, str]:
    import sklearn

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "scikit-learn": sklearn.__version__,
    }


@contextmanager
def staging(name: str, version: int) -> Iterator[Path]:
    """A scratch `<name>/<version>/` folder to build an artifact in before it is published."""
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        folder = Path(tmp) / name / str(version)
        folder.mkdir(parents=True)
        yield folder


def publish(manifest: Manifest, staged: Path, repository: Path, force: bool = False) -> Path:
    """Write the manifest, prove the service itself loads and runs the artifact, then move it into
    the repository. An existing version is replaced only with `force`: refused, nothing is written."""
    require_free(repository, manifest.name, manifest.version, force)
    write_manifest(manifest, staged)
    every_graph = Settings(device="cpu", warmup=True, device_cache="on", lazy_attention=False)
    served = load_model(staged.parent, every_graph, TASK_CHECKS)
    if served.state != "ready" or served.failed_graphs:  # an optional graph too: every graph must load
        reason = served.reason or "; ".join(f"{graph}: {why}" for graph, why in served.failed_graphs.items())
        raise ExportError(f"the service cannot load the exported model: {reason}")
    return move_in(staged, repository / manifest.name / str(manifest.version))


def move_in(staged: Path, target: Path) -> Path:
    """Copies `staged` beside `target` under a name the service never reads (a dot first), then
    renames it into place: a service polling the repository sees the whole version or none of it.
    A version replaced (`--force`) is renamed aside first and deleted after."""
    target.parent.mkdir(parents=True, exist_ok=True)
    beside = target.parent / f".{target.name}.incoming-{os.getpid()}"
    old = target.parent / f".{target.name}.replaced-{os.getpid()}"
    for leftover in (beside, old):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(staged, beside)
    if target.exists():
        target.rename(old)
    beside.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def require_free(repository: Path, name: str, version: int, force: bool = False) -> None:
    """Refuse to replace `repository/name/version` unless `force` (a shipped model is one command away)."""
    target = repository / name / str(version)
    if target.exists() and not force:
        raise ExportError(f"{target} exists; pass --force to replace it, or choose another --name or --version")
