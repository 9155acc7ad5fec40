"""Model-independent export steps: trace to ONNX, run under ONNX Runtime, check parity, publish."""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from service.manifest import GraphSpec, Manifest, Parity, Preprocessing, write_manifest
from service.repository import load_model
from service.settings import Settings
from service.tasks import TASKS, manifest_checks

OPSET = 18
TRACED_BATCH = 2  # the batch size traced at export; parity runs at another one
PARITY_BATCH = 37
PARITY_TOLERANCE = 1e-4


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
    names = [t.name for t in spec.inputs]
    to_onnx(
        module, (torch.from_numpy(inputs[:TRACED_BATCH]),), folder / spec.file, names, [t.name for t in spec.outputs]
    )
    session = ort.InferenceSession(str(folder / spec.file), providers=["CPUExecutionProvider"])
    return run_batched(session, names[0], inputs, PARITY_BATCH)


@torch.no_grad()
def torch_outputs(module: torch.nn.Module, inputs: np.ndarray, batch_size: int = 64) -> list[np.ndarray]:
    """The PyTorch reference: every output of `module` over `inputs`."""
    module.eval()
    chunks = []
    for i in range(0, len(inputs), batch_size):
        out = module(torch.from_numpy(inputs[i : i + batch_size]))
        chunks.append([t.numpy() for t in (out if isinstance(out, tuple) else (out,))])
    return [np.concatenate(outputs) for outputs in zip(*chunks, strict=True)]


def check_parity(
    reference: np.ndarray,
    candidate: np.ndarray,
    batch_size: int,
    extra: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    float32_error: float = 0.0,
) -> Parity:
    """ONNX Runtime against PyTorch: the max abs difference over the logits (and any `extra` output
    pairs), and whether the logits' argmax is identical everywhere. The tolerance is 1e-4, or twice
    PyTorch's own float32 error where that is larger (a deep post-norm model's logits can carry
    more float32 noise than 1e-4; ONNX Runtime cannot be held closer to PyTorch than that)."""
    pairs = [(reference, candidate), *extra]
    diff = max(float(np.abs(ref.astype(np.float64) - cand).max()) for ref, cand in pairs)
    return Parity(
        max_abs_diff=diff,
        tolerance=max(PARITY_TOLERANCE, 2 * float32_error),
        float32_error=float32_error,
        batch_size=batch_size,
        traced_batch_size=TRACED_BATCH,
        argmax_equal=bool((reference.argmax(-1) == candidate.argmax(-1)).all()),
    )


@torch.no_grad()
def float32_error(module: torch.nn.Module, *inputs: torch.Tensor) -> float:
    """Max abs difference of the first output between float32 and float64 PyTorch on the same inputs."""
    module.eval()
    exact = copy.deepcopy(module).double()
    widen = [t.double() if t.is_floating_point() else t for t in inputs]
    single, double = module(*inputs), exact(*widen)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    return float((first(single).double() - first(double)).abs().max())


def require_parity(parity: Parity) -> None:
    if not (parity.max_abs_diff <= parity.tolerance and parity.argmax_equal):
        raise ExportError(
            f"ONNX parity failed at batch {parity.batch_size}: max abs diff {parity.max_abs_diff:.3g} "
            f"(tolerance {parity.tolerance}), argmax equal: {parity.argmax_equal}; nothing was written"
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
    served = load_model(staged.parent, Settings(device="cpu", warmup=True), manifest_checks(TASKS))
    if served.state != "ready":
        raise ExportError(f"the service cannot load the exported model: {served.reason}")
    target = repository / manifest.name / str(manifest.version)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(staged, target)
    return target


def require_free(repository: Path, name: str, version: int, force: bool = False) -> None:
    """Refuse to replace `repository/name/version` unless `force` (a shipped model is one command away)."""
    target = repository / name / str(version)
    if target.exists() and not force:
        raise ExportError(f"{target} exists; pass --force to replace it, or choose another --name or --version")
