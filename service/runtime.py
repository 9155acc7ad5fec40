"""ONNX Runtime sessions: which execution providers to ask for, and which we actually got."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.settings import Settings

log = logging.getLogger("service")

OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
EXECUTION_MODE = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL, "parallel": ort.ExecutionMode.ORT_PARALLEL}
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def inference_threads(workers: int = 1) -> int:
    """Each worker's share of the cores, but one: its event loop (HTTP, decoding, postprocessing) keeps
    a core of its own, so it works while a batch runs instead of both fighting over every core."""
    return max(1, len(os.sched_getaffinity(0)) // workers - 1)


class DeviceUnavailable(RuntimeError):
    """device=cuda where CUDA cannot be used (and falling back was not allowed)."""


def check_device(settings: Settings) -> None:
    """At start: device=cuda needs onnxruntime's CUDA provider, unless `cuda_fallback` allows the CPU."""
    available = ort.get_available_providers()
    if settings.device != "cuda" or CUDA in available:
        return
    message = (
        f"VITSERVE_DEVICE=cuda, but this onnxruntime offers only {available}: install onnxruntime-gpu (see the "
        "README's GPU section) on a host with an NVIDIA driver, or set VITSERVE_CUDA_FALLBACK=true"
    )
    if not settings.cuda_fallback:
        raise DeviceUnavailable(message)
    log.warning("%s; serving on the CPU", message)


def requested_providers(device: str) -> list[str]:
    """The providers to ask for, best first. CPU is always last, so a model still loads if CUDA fails;
    the caller reports the providers the session really uses, never assumes them."""
    if device == "cpu" or CUDA not in ort.get_available_providers():
        return [CPU]
    return [CUDA, CPU]


def provider_options(options: dict[str, str | int | float | bool]) -> dict[str, str]:
    """ONNX Runtime takes provider options as strings: JSON numbers and booleans become "8589934592", "1"."""
    return {k: ("1" if v else "0") if isinstance(v, bool) else str(v) for k, v in options.items()}


def create_session(path: Path, settings: Settings) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION[settings.graph_optimization]
    options.intra_op_num_threads = settings.intra_op_threads or inference_threads(settings.workers)
    options.inter_op_num_threads = settings.inter_op_threads
    options.execution_mode = EXECUTION_MODE[settings.execution_mode]
    options.enable_cpu_mem_arena = settings.cpu_mem_arena
    spin = "1" if settings.spin_wait else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    providers = requested_providers(settings.device)
    per_provider = [provider_options(settings.cuda_options) if p == CUDA else {} for p in providers]
    session = ort.InferenceSession(str(path), options, providers=providers, provider_options=per_provider)
    if session.get_providers()[0] != providers[0]:
        message = f"{path.name}: asked for {providers[0]} but the session runs on {session.get_providers()}"
        if settings.device == "cuda" and not settings.cuda_fallback:  # CUDA listed but unusable (no driver, libs)
            raise DeviceUnavailable(f"{message}; ONNX Runtime's log says why")
        log.warning(message)
    return session


def on_cuda(session: ort.InferenceSession) -> bool:
    return bool(session.get_providers()[0] == CUDA)


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray], io_binding: bool) -> list[np.ndarray]:
    """session.run, or with I/O binding (used on CUDA): outputs are bound on the session's own device
    and copied to the host once, after the run; inputs go from host memory straight to the device."""
    if not io_binding:
        return list(session.run(None, feeds))
    device, device_id = session_device(session)
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(array))
    for output in session.get_outputs():
        binding.bind_output(output.name, device, device_id)
    session.run_with_iobinding(binding)
    return [value.numpy() for value in binding.get_outputs()]


def session_device(session: ort.InferenceSession) -> tuple[str, int]:
    """Where a session's tensors live: ("cuda", its device id) or ("cpu", 0)."""
    if not on_cuda(session):
        return "cpu", 0
    return "cuda", int(session.get_provider_options()[CUDA].get("device_id", 0))
