"""ONNX Runtime sessions: which execution providers to ask for, and which we actually got."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import io
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.manifest import GraphSpec
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
TENSORRT = "TensorrtExecutionProvider"


def every_core(workers: int = 1) -> int:
    """Each worker's share of the cores."""
    return max(1, len(os.sched_getaffinity(0)) // workers)


def inference_threads(workers: int = 1) -> int:
    """Each worker's share of the cores, but one: its event loop (HTTP, decoding, postprocessing) keeps
    a core of its own, so it works while a batch runs instead of both fighting over every core (for
    a model whose run is short; a long one gets every core: see repository.heavy)."""
    return max(1, every_core(workers) - 1)


class DeviceUnavailable(RuntimeError):
    """A GPU provider the settings insist on cannot run (and serving without it was not allowed)."""


# Conv (cuDNN) then MatMul (cuBLAS) over ones: 8.0 everywhere (written by `python -m export.probe`)
PROBE = Path(__file__).with_name("probe.onnx")


def may_serve_without(provider: str, settings: Settings) -> bool:
    """Whether a model may run below `provider` when it fails: TensorRT, asked for by name, only
    with cuda_fallback; CUDA also where device=auto (the CPU is what auto falls back to)."""
    return settings.cuda_fallback or (provider == CUDA and settings.device == "auto")


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:600] or type(exc).__name__


def probe(providers: list[str], options: list[dict[str, str]]) -> str | None:
    """Why the probe graph cannot run on `providers[0]`; None where it ran there and answered right.
    ONNX Runtime's own fallback is off: its retry would hide the reason, or fail the same way. Where
    it skips a provider it only logs why (a library it could not load): that log is the reason."""
    with logged_by_onnx_runtime() as log_lines:
        try:
            session = ort.InferenceSession(str(PROBE), providers=providers, provider_options=options, enable_fallback=0)
            (answer,) = session.run(None, {"x": np.ones((1, 2, 4, 4), np.float32)})
        except Exception as exc:
            return one_line(exc)
    if session.get_providers()[0] != providers[0]:
        return f"ONNX Runtime opened the graph on {session.get_providers()}, saying: {' | '.join(log_lines) or '-'}"
    return None if np.array_equal(answer, np.full((1, 2, 4, 4), 8.0, np.float32)) else "it computed a wrong answer"


ORT_LOG_LINE = re.compile(r"\[[EW]:onnxruntime:[^\]]*\] (.*)")


def messages(log: str) -> list[str]:
    """The messages of ONNX Runtime's warnings and errors in `log`, without colours and source locations."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log)
    said = [re.sub(r".*\[ONNXRuntimeError\] : \d+ : \w+ : ", "", m.group(1)) for m in ORT_LOG_LINE.finditer(plain)]
    return [" ".join(line.split())[:400] for line in said]


@contextlib.contextmanager
def logged_by_onnx_runtime() -> Iterator[list[str]]:
    """The warnings and errors ONNX Runtime writes to the process's stderr meanwhile (its C++ logger
    writes there directly), passed on to stderr as well. For start-up only: it borrows file descriptor 2."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
            sys.stderr.write(text)
            lines += messages(text)


def preload_gpu_libraries(tensorrt: bool) -> None:
    """CUDA's and cuDNN's libraries from NVIDIA's wheels (the `gpu` extra) and TensorRT's (the
    `tensorrt` extra), loaded before any session: the providers look for them on the library path
    only, where pip does not put them. Where the libraries are on that path (the GPU image), a no-op."""
    if CUDA not in ort.get_available_providers():
        return
    with contextlib.redirect_stdout(io.StringIO()) as said:  # it prints what it could not load
        ort.preload_dlls()
    if said.getvalue().strip():
        log.info("onnxruntime.preload_dlls: %s", " ".join(said.getvalue().split()))
    trt = importlib.util.find_spec("tensorrt_libs") if tensorrt else None
    folders = list(trt.submodule_search_locations or []) if trt else []
    for folder in folders:
        for pattern in ("libnvinfer.so.*", "libnvonnxparser.so.*"):  # the two the TensorRT provider links
            for library in sorted(Path(folder).glob(pattern)):
                ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)


def gpu_hint() -> str:
    built = getattr(getattr(ort.capi, "build_and_package_info", None), "cuda_version", "")
    cuda = f"onnxruntime-gpu {ort.__version__} is built for CUDA {built}: it needs" if built else "it needs"
    return (f"{cuda} an NVIDIA driver of 580 or later, CUDA 13's and cuDNN 9's libraries (pip install "
            "'vitserve[gpu]' brings them; see the GPU docs), and a visible GPU")  # fmt: skip


def check_device(settings: Settings) -> Settings:
    """At start, before any model: prove each GPU provider the settings ask for by running the probe
    graph on it. Returns the settings to serve with: where a provider fails and serving without it is
    allowed, settings without it (and a logged reason); where not, DeviceUnavailable with the reason."""
    if settings.device == "cpu":
        return settings
    preload_gpu_libraries(settings.tensorrt)
    failed = provider_failure(CUDA, settings)
    if failed:
        settings = serve_without(CUDA, settings, f"{CUDA} cannot run: {failed}; {gpu_hint()}")
    failed = provider_failure(TENSORRT, settings) if settings.tensorrt and settings.device != "cpu" else None
    if failed:
        settings = serve_without(TENSORRT, settings, f"VITSERVE_TENSORRT=true, but {TENSORRT} cannot run: {failed}")
    return settings


def provider_failure(provider: str, settings: Settings) -> str | None:
    """Why `provider` cannot serve; None where the probe ran on it (or, for CUDA under device=auto,
    where this onnxruntime has no CUDA at all: auto then means the CPU)."""
    available = ort.get_available_providers()
    if provider not in available:
        if provider == CUDA and settings.device == "auto":
            return None
        extra = " and 'vitserve[tensorrt]'" if provider == TENSORRT else ""
        return f"this onnxruntime offers only {available}: install onnxruntime-gpu{extra}"
    cuda = provider_options(settings.cuda_options)
    if provider == CUDA:
        return probe([CUDA, CPU], [cuda, {}])
    return probe([TENSORRT, CUDA, CPU], [{"device_id": cuda.get("device_id", "0")}, cuda, {}])


def serve_without(provider: str, settings: Settings, why: str) -> Settings:
    """The settings without `provider` where allowed (logged), else DeviceUnavailable."""
    if not may_serve_without(provider, settings):
        raise DeviceUnavailable(f"VITSERVE_DEVICE={settings.device}: {why}. Set VITSERVE_CUDA_FALLBACK=true to serve "
                                "without it")  # fmt: skip
    without = {"tensorrt": False} if provider == TENSORRT else {"device": "cpu", "tensorrt": False}
    log.warning("%s; serving without %s", why, provider)
    return settings.model_copy(update=without)


def requested_providers(device: str, tensorrt: bool = False) -> list[str]:
    """The providers to ask for, best first. CPU is always last, so a model still loads if CUDA fails;
    the caller reports the providers the session really uses, never assumes them."""
    available = ort.get_available_providers()
    if device == "cpu" or CUDA not in available:
        return [CPU]
    return [TENSORRT] * (tensorrt and TENSORRT in available) + [CUDA, CPU]


def provider_options(options: dict[str, str | int | float | bool]) -> dict[str, str]:
    """ONNX Runtime takes provider options as strings: JSON numbers and booleans become "8589934592", "1"."""
    return {k: ("1" if v else "0") if isinstance(v, bool) else str(v) for k, v in options.items()}


# the named axes a replayed CUDA graph can fix: the batch (padded to a warmed size) and a pool's capacity
REPLAYABLE_AXES = {"batch", "capacity"}


def replayable(spec: GraphSpec) -> bool:
    """A graph CUDA graphs can replay: every axis fixed, but the batch (runs are padded to warmed
    sizes) and a cache pool's capacity (its buffers are allocated once)."""
    axes = {d for t in [*spec.inputs, *spec.outputs] for d in t.shape if isinstance(d, str)}
    return axes <= REPLAYABLE_AXES


def profile_shapes(spec: GraphSpec, batch: int) -> str:
    """TensorRT's shapes at one batch size, e.g. "pixel_values:8x3x224x224,labels:8" (inputs of fixed
    shape need no profile)."""
    return ",".join(
        f"{t.name}:" + "x".join(str(batch if d == "batch" else d) for d in t.shape)
        for t in spec.inputs
        if "batch" in t.shape
    )


def trt_cache_dir(settings: Settings, path: Path) -> Path:
    """One folder per model version: engines are keyed by the graph, and a new version starts afresh."""
    root = settings.trt_cache_dir or settings.model_repository / ".trt_cache"
    return root / path.parent.parent.name / path.parent.name


def tensorrt_options(
    spec: GraphSpec | None, batch_sizes: Sequence[int], cache: Path, fp16: bool, largest: int = 0
) -> dict[str, str]:
    """Engine and timing caches on disk (a restart loads the engines instead of building them for
    minutes), float16 layers where allowed, and one optimisation profile from the smallest warmed
    batch to `largest` (the biggest run the service can make: a lone request may exceed the batch
    size, and outside its profile an engine cannot run), tuned for the largest warmed batch (a full
    batch is what load brings; a lone image is fast anyway)."""
    options = {
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": "1" if fp16 else "0",
    }
    dims = {d for t in spec.inputs for d in t.shape if isinstance(d, str)} if spec else set()
    if spec is None or dims != {"batch"}:  # no batch axis, or axes we know no sizes of: TensorRT builds per shape
        return options
    return options | {
        "trt_profile_min_shapes": profile_shapes(spec, min(batch_sizes)),
        "trt_profile_opt_shapes": profile_shapes(spec, max(batch_sizes)),
        "trt_profile_max_shapes": profile_shapes(spec, max(largest, *batch_sizes)),
    }


def cuda_options(settings: Settings, spec: GraphSpec | None, path: Path) -> dict[str, str]:
    """The CUDA settings, with CUDA graphs where the graph can be replayed (a captured graph replays
    one shape at the addresses it captured: see `Replays`)."""
    options = provider_options(settings.cuda_options)
    if settings.cuda_graphs and spec is not None and replayable(spec):
        options["enable_cuda_graph"] = "1"
    elif settings.cuda_graphs:
        log.warning("%s: no CUDA graphs, it has axes other than the batch whose sizes vary by request", path.name)
    return options


def session_provider_options(
    providers: list[str], path: Path, settings: Settings, spec: GraphSpec | None, batch_sizes: Sequence[int],
    fp16: bool, largest: int = 0,
) -> list[dict[str, str]]:  # fmt: skip
    """Each requested provider's options, in the same order."""
    per_provider = []
    for provider in providers:
        if provider == TENSORRT:
            cache = trt_cache_dir(settings, path)
            cache.mkdir(parents=True, exist_ok=True)
            options = tensorrt_options(spec, batch_sizes, cache, fp16 or settings.trt_fp16, largest)
            per_provider.append({"device_id": str(settings.cuda_options.get("device_id", 0)), **options})  # CUDA's GPU
        else:
            per_provider.append(cuda_options(settings, spec, path) if provider == CUDA else {})
    return per_provider


# Spinning, for a heavy graph's threads (settings.heavy_spin_us): a thread that sleeps as soon as it is idle
# sleeps between every two operators (a ViT-B/16 run hands ~250 over), and waking it (on a VM, a halted
# core) takes tens of microseconds each time; ONNX Runtime's own spin (about 2^20 pauses: tens of ms, after
# every run too) takes the cores from decoding, HTTP and the rest of the host. A bound of a few hundred
# microseconds bridges the operators and costs at most that after a run (docs/production.md has the figures).
def session_options(settings: Settings, threads: int = 0, spin_us: int = 0) -> ort.SessionOptions:
    """The settings' session options; `threads`, if given, overrides the intra-op threads; `spin_us`,
    if given, lets idle intra-op threads spin that long before they sleep (unless `spin_wait` lets
    them spin as long as ONNX Runtime likes)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION[settings.graph_optimization]
    options.intra_op_num_threads = threads or settings.intra_op_threads or inference_threads(settings.workers)
    options.inter_op_num_threads = settings.inter_op_threads
    options.execution_mode = EXECUTION_MODE[settings.execution_mode]
    options.enable_cpu_mem_arena = settings.cpu_mem_arena
    spin = "1" if settings.spin_wait else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_us else spin)
    if spin_us and not settings.spin_wait:
        options.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return options


def create_session(
    path: Path, settings: Settings, spec: GraphSpec | None = None, batch_sizes: Sequence[int] = (1,),
    fp16: bool = False, largest: int = 0, threads: int = 0, spin_us: int = 0,
) -> ort.InferenceSession:  # fmt: skip
    """A session on the best provider asked for that opens the graph; on one below it only where
    `may_serve_without` allows (logged), else DeviceUnavailable. `spec`, `batch_sizes` and `largest`
    (batch) shape TensorRT's profile, `fp16` (a float16 model) turns on TensorRT's float16 layers;
    `threads` and `spin_us`, if given, set the intra-op threads and how long idle ones spin (session_options)."""
    options = session_options(settings, threads, spin_us)
    providers = requested_providers(settings.device, settings.tensorrt)
    per_provider = session_provider_options(providers, path, settings, spec, batch_sizes, fp16, largest)
    failures: dict[str, str] = {}
    for first, provider in enumerate(providers):  # the CPU is always last
        try:
            session = open_session(path, options, providers[first:], per_provider[first:])
        except Exception as exc:
            if provider == CPU:
                raise  # the model's own fault: the CPU cannot open it either
            failures[provider] = one_line(exc)
            continue
        running = session.get_providers()[0]
        for skipped in providers[: providers.index(running)]:  # it failed, or ONNX Runtime left it out
            why = f"{path.name}: asked for {skipped}, runs on {running}: {failures.get(skipped, 'not used')}"
            if not may_serve_without(skipped, settings):
                raise DeviceUnavailable(why)
            log.warning(why)
        return session
    raise AssertionError("unreachable: the CPU opens the graph or raises")


def open_session(
    path: Path, options: ort.SessionOptions, providers: list[str], per_provider: list[dict[str, str]]
) -> ort.InferenceSession:
    """A session on these providers, without ONNX Runtime's own fallback (create_session does its
    own, and says why); without CUDA graphs where ONNX Runtime refuses to capture the graph."""
    open_with = partial(ort.InferenceSession, str(path), options, providers=providers, enable_fallback=0)
    try:
        return open_with(provider_options=per_provider)
    except Exception as exc:  # ONNX Runtime refuses CUDA graphs for a graph with nodes off the GPU
        if not any(p.get("enable_cuda_graph") == "1" for p in per_provider):
            raise
        log.warning("%s: no CUDA graphs, ONNX Runtime refused them (%s)", path.name, one_line(exc)[:300])
        return open_with(
            provider_options=[{k: v for k, v in p.items() if k != "enable_cuda_graph"} for p in per_provider]
        )


def on_cuda(session: ort.InferenceSession) -> bool:
    """On the GPU: CUDA, or TensorRT (which hands CUDA what it cannot build)."""
    return bool(session.get_providers()[0] in (TENSORRT, CUDA))


# a graph's feeds -> its outputs, on the host: a session's run, or a runner that binds more itself
GraphRun = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def run(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], io_binding: bool, options: ort.RunOptions | None = None
) -> list[np.ndarray]:
    """session.run, or with I/O binding (used on CUDA): outputs are bound on the session's own device
    and copied to the host once, after the run; inputs go from host memory straight to the device."""
    if not io_binding:
        return list(session.run(None, feeds, options))
    binding = bind(session, feeds)
    for output in session.get_outputs():
        binding.bind_output(output.name, *session_device(session))
    session.run_with_iobinding(binding, options)
    return [value.numpy() for value in binding.get_outputs()]


def bind(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> ort.IOBinding:
    """A binding with `feeds` bound from host memory."""
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(array))
    return binding


NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}  # fmt: skip


def graph_options(graph_id: int) -> ort.RunOptions:
    """Run options naming the CUDA graph a run captures or replays (-1: none, an ordinary run)."""
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


Bound = dict[str, ort.OrtValue]  # inputs and outputs bound to buffers of the caller's (a cache pool's)


class FixedBinding:
    """I/O binding to device buffers allocated once, for one batch size. A CUDA graph replays the
    addresses it captured, so every run copies its inputs into the same buffers and reads the same
    output buffers. `bound` inputs and outputs are bound as given (a cache pool's, fixed already)."""

    def __init__(
        self, session: ort.InferenceSession, batch: int, graph_id: int = -1, bound: Bound | None = None
    ) -> None:
        device = session_device(session)
        self.session = session
        self.binding = session.io_binding()
        self.options = graph_options(graph_id)
        bound = bound or {}

        def value(arg: ort.NodeArg) -> ort.OrtValue:
            if arg.name in bound:
                return bound[arg.name]
            shape = [batch if isinstance(d, str) else d for d in arg.shape]
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, NUMPY_TYPES[arg.type], *device)

        self.inputs = {arg.name: value(arg) for arg in session.get_inputs()}
        for name, input_value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, input_value)
        outputs = {arg.name: value(arg) for arg in session.get_outputs()}
        for name, output_value in outputs.items():
            self.binding.bind_ortvalue_output(name, output_value)
        self.outputs = [v for name, v in outputs.items() if name not in bound]  # the pools' stay where they are

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs but the bound ones, for `feeds` of exactly this binding's batch size."""
        for name, array in feeds.items():
            self.inputs[name].update_inplace(np.ascontiguousarray(array))
        self.session.run_with_iobinding(self.binding, self.options)
        return [value.numpy() for value in self.outputs]


def padded(array: np.ndarray, size: int, fill: int | None = None) -> np.ndarray:
    """`array` grown to `size` rows: copies of its last row, or rows of `fill`."""
    extra = size - len(array)
    if extra == 0:
        return array
    rows = np.full((extra, *array.shape[1:]), fill, array.dtype) if fill is not None else array[-1:].repeat(extra, 0)
    return np.concatenate([array, rows])


class Replays:
    """A graph run through CUDA graphs, one captured per warmed batch size: a run is padded to the
    smallest warmed size that holds it and cut back after, so every run replays a captured graph. A
    run larger than every warmed size (a lone request over max_batch_size) runs as usual, uncaptured
    (`fallback`). `fill` gives padding rows a value instead of copies of the last row (a cache pool's
    spare slot). Every captured run, warm-up's included, happens on one thread of its own: ONNX
    Runtime keeps a captured graph in the capturing thread's context (cuda_execution_provider.h),
    and the batcher's runs come from any of the model's threads, or the event loop's. The thread
    also runs them one at a time, as the shared buffers need, and as ONNX Runtime requires of a
    session with CUDA graphs on, the uncaptured runs included."""

    def __init__(
        self, session: ort.InferenceSession, sizes: Sequence[int], fallback: GraphRun,
        bound: Bound | None = None, fill: dict[str, int] | None = None,
    ) -> None:  # fmt: skip
        self.bindings = {
            size: FixedBinding(session, size, graph_id, bound) for graph_id, size in enumerate(sorted(sizes))
        }
        self.fallback = fallback
        self.fill = fill or {}
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="cuda-graphs")

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        rows = len(next(iter(feeds.values())))
        size = next((size for size in self.bindings if size >= rows), None)
        if size is None:  # uncaptured, but on the same thread: one run at a time on a session with graphs on
            return self.thread.submit(self.fallback, feeds).result()
        grown = {name: padded(array, size, self.fill.get(name)) for name, array in feeds.items()}
        outputs = self.thread.submit(self.bindings[size].run, grown).result()
        return [output[:rows] for output in outputs]


def cuda_graph(session: ort.InferenceSession) -> bool:
    return on_cuda(session) and session.get_provider_options().get(CUDA, {}).get("enable_cuda_graph") == "1"


def runner(session: ort.InferenceSession, sizes: Sequence[int] = (1,)) -> GraphRun:
    """The session's run as requests take it: with I/O binding on a GPU, through CUDA graphs at
    `sizes` (the warmed batch sizes) where they are enabled."""
    if not cuda_graph(session):
        return partial(run, session, io_binding=on_cuda(session))
    return Replays(session, sizes, partial(run, session, io_binding=True, options=graph_options(-1)))


def session_device(session: ort.InferenceSession) -> tuple[str, int]:
    """Where a session's tensors live: ("cuda", its device id) or ("cpu", 0)."""
    if not on_cuda(session):
        return "cpu", 0
    first = session.get_providers()[0]
    return "cuda", int(session.get_provider_options()[first].get("device_id", 0))
