"""The served models: each model's versions as its version policy picks them, looked up for requests,
and loaded, reloaded and unloaded while traffic flows (Triton's model control, service/control.py).

A new or changed version loads and warms up beside the one serving, and takes requests only once it
is ready; one that fails to load changes nothing but the reason shown. A version taken out of
service first leaves the lookup (new requests go elsewhere), then waits for the requests that hold
it (their lease, service/repository.py) before its sessions and memory go. Loads run one at a time,
off the event loop; the registry's maps change only on the event loop."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from service.errors import ServiceError
from service.manifest import ModelConfig, read_model_config
from service.memory import trim
from service.repository import (
    ManifestChecks,
    ServedModel,
    _reason,
    fingerprint,
    load_measured,
    mark_served,
    version_dirs,
)
from service.settings import Settings
from service.text import quoted

log = logging.getLogger("service")
T = TypeVar("T")

# Longest an unload waits for the requests holding a version, past the longest a request may wait
# for its answer; after it the version goes anyway (a stream still running then ends with an error).
DRAIN_GRACE_S = 5.0


@dataclass
class Entry:
    """One model of the repository: the versions it serves and what went wrong."""

    name: str
    versions: dict[int, ServedModel] = field(default_factory=dict)  # serving: ready, by version
    failures: dict[int, ServedModel] = field(default_factory=dict)  # versions whose last load failed
    reason: str | None = None  # why the model itself cannot be read (no version to serve, a bad config.json)

    @property
    def default(self) -> ServedModel | None:
        """The version a request that names none gets: the highest serving."""
        return self.versions[max(self.versions)] if self.versions else None

    def shown(self) -> ServedModel:
        """The model as one line of readiness shows it: its default version, else why it has none."""
        if self.default is not None:
            return self.default
        if self.failures:
            return self.failures[max(self.failures)]
        return ServedModel(name=self.name, path=Path(self.name), reason=self.reason or "no version loaded")


def collect() -> None:
    """The collector over everything, what was loaded at start included (frozen out of its sight then:
    cycles among it too), then frozen again; freed memory given back to the system."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()  # what lives now is the service's: full collections under load stay short
    trim()


async def _collect_when_free(model: ServedModel) -> None:
    """collect(), once no request holds the (closed) model: what they held would be frozen for good."""
    while model.leases:
        await asyncio.sleep(0.1)
    del model
    collect()


def _serves_besides(model: ServedModel, task: str) -> bool:
    """Whether the task is one the model serves besides its own."""
    return model.manifest is not None and model.manifest.task != task


def _on_loop(model: ServedModel) -> None:
    """Nothing: what the registry tells of models before anyone listens."""


class ModelRegistry:
    def __init__(self, settings: Settings | None = None, checks: ManifestChecks | None = None) -> None:
        self.settings = settings or Settings()
        self.checks: ManifestChecks = checks or {}
        self.entries: dict[str, Entry] = {}
        self.reason: str | None = None  # why nothing can serve (no repository, an empty one)
        self.loading: set[tuple[str, int]] = set()
        # the models the repository held at start (until unloaded): readiness waits for each of them; a
        # model added later that fails to load is shown failed, but takes the others out of no load balancer
        self.required: set[str] = set()
        self.unloading: dict[tuple[str, int, int], asyncio.Task[None]] = {}  # (name, version, id) -> its drain
        self.lock = asyncio.Lock()  # one load or unload at a time
        self.tasks: set[asyncio.Task[Any]] = set()  # loads under way, collections waiting (see _background)
        self.on_loaded: Callable[[ServedModel], None] = _on_loop  # the app wires its metrics here
        self.on_unloaded: Callable[[ServedModel], None] = _on_loop

    @property
    def root(self) -> Path:
        return self.settings.model_repository

    # lookups --------------------------------------------------------------------------------------

    @property
    def models(self) -> dict[str, ServedModel]:
        """Each model as a request naming no version finds it (or why it cannot), by name."""
        return {name: self.entries[name].shown() for name in sorted(self.entries)}

    def served(self) -> list[ServedModel]:
        """Every version serving, and every one whose load failed, by name then version."""
        found = [[*e.versions.values(), *e.failures.values()] or [e.shown()] for e in self.entries.values()]
        return sorted((m for models in found for m in models), key=lambda m: (m.name, m.version))

    @property
    def ready(self) -> bool:
        """Some model serves, and so does every model the repository held at start. In explicit mode
        a server with nothing left to serve is ready too (as Triton's): the operator's next load
        must reach it through the load balancer."""
        serving = {name for name, entry in self.entries.items() if entry.versions}
        if self.settings.model_control_mode == "explicit" and not self.required:
            return self.root.is_dir()
        return bool(serving) and self.required <= serving

    def resolve(self, name: str | None, task: str, graph: str = "main", version: int | None = None) -> ServedModel:
        """The model a request asked for (that version, or its highest), or the first ready model of
        its task; it must have `graph`."""
        model = self._pick(name, task, version)
        if graph in model.failed_graphs:
            raise ServiceError(503, "graph_not_ready", f"model {model.name!r}'s {graph} graph failed to load: "
                               f"{model.failed_graphs[graph]}")  # fmt: skip
        if not model.has_graph(graph):
            why = model.manifest.absent_graphs.get(graph) if model.manifest else None
            raise ServiceError(422, f"no_{graph}_graph", f"model {model.name!r} was exported without a {graph!r} graph"
                               + (f": {why}" if why else ""))  # fmt: skip
        return mark_served(model)

    def _pick(self, name: str | None, task: str, version: int | None) -> ServedModel:
        if name is not None:
            model = self.named(name, version)
            if model.manifest is not None and task not in model.manifest.tasks:
                raise ServiceError(422, "wrong_task", f"model {name!r} serves {', '.join(model.manifest.tasks)}, "
                                   f"not {task}")  # fmt: skip
            return model
        shown = [m for m in self.models.values() if m.manifest and task in m.manifest.tasks]
        # models of the task itself first, then those that serve it besides their own (CLIP's embeddings)
        ready = sorted((m for m in shown if m.state == "ready"), key=lambda m: _serves_besides(m, task))
        if ready:
            return self.named(ready[0].name, version) if version is not None else ready[0]
        failed = [f"{m.name}: {m.reason}" for m in self.models.values() if m.state == "failed"]
        if failed:
            raise ServiceError(503, "model_not_ready", f"no {task} model is ready ({'; '.join(failed)})")
        raise ServiceError(404, "no_model", f"the repository has no {task} model")

    def named(self, name: str, version: int | None = None) -> ServedModel:
        """That model (that version, or its highest serving): 404 where there is none, 503 where it
        is not ready."""
        entry = self.entries.get(name)
        if entry is None and any(loading == name for loading, _ in self.loading):
            raise ServiceError(503, "model_not_ready", f"model {name!r} is loading", {"Retry-After": "1"})
        if entry is None:
            raise ServiceError(404, "unknown_model", f"unknown model {quoted(name)}; models: {sorted(self.entries)}")
        if version is None:
            model = entry.shown()
            if model.state != "ready" or model.manifest is None:
                raise ServiceError(503, "model_not_ready", f"model {name!r} is not ready: {model.reason}")
            return model
        if version in entry.versions:
            return entry.versions[version]
        if (name, version) in self.loading:
            raise ServiceError(503, "model_not_ready", f"model {name!r} version {version} is loading",
                               {"Retry-After": "1"})  # fmt: skip
        if version in entry.failures:
            reason = entry.failures[version].reason
            raise ServiceError(503, "model_not_ready", f"model {name!r} version {version} failed to load: {reason}")
        raise ServiceError(404, "unknown_version", f"model {quoted(name)} serves no version {version}; it serves "
                           f"{sorted(entry.versions)}")  # fmt: skip

    # loading and unloading ------------------------------------------------------------------------

    def names_on_disk(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    async def start(self) -> None:
        """Every model in the repository, loaded and warmed up (at start, before any request)."""
        if not self.root.is_dir():
            log.error("model repository %s does not exist", self.root)
            self.reason = f"the model repository {self.root.name!r} does not exist (VITSERVE_MODEL_REPOSITORY)"
            return
        for name in self.names_on_disk():  # in the lifespan itself: a shutdown during start stops it
            await self._reconcile_alone(name, None, retry=True)
        self.required = set(self.entries)
        if not self.entries:
            self.reason = "the model repository holds no model"

    async def load(self, name: str, config: ModelConfig | None = None, retry: bool = True, refuse: bool = True) -> None:
        """Brings the model's served versions in line with its folder and version policy (`config`
        overrides its config.json): new or changed versions load beside those serving and replace
        them when ready; versions the policy drops are unloaded. `retry`: a version that failed
        before tries again though its files are unchanged. `refuse`: a model left with no version
        serving is a 400 saying why (the load API's answer)."""
        # a task of its own: a caller that leaves (its request's 504, a client gone) leaves the load going
        entry = await asyncio.shield(self._background(self._reconcile_alone(name, config, retry)))
        if refuse and (entry is None or not entry.versions):
            why = "the repository has no folder of that name" if entry is None else entry.shown().reason
            raise ServiceError(400, "load_failed", f"failed to load {quoted(name)}: {why}")
        if refuse and entry is not None and (entry.reason or entry.failures):  # a bad config.json, a broken version
            why = entry.reason or f"version {max(entry.failures)}: {entry.failures[max(entry.failures)].reason}"
            raise ServiceError(400, "load_failed", f"failed to load {quoted(name)}: {why}; version "
                               f"{max(entry.versions)} serves on")  # fmt: skip

    async def unload(self, name: str) -> None:
        """Takes the model out of service; returns once its versions' requests are done and their memory freed."""
        async with self.lock:
            self._retire_all(name)
        retiring = [task for (unloading, _, _), task in self.unloading.items() if unloading == name]
        if retiring:  # waited for, never cancelled: a caller that leaves leaves the drains going
            await asyncio.wait(retiring)
        log.info("model %s unloaded", name)

    async def poll(self) -> None:
        """Loads what changed in the repository since the last look, and unloads what left it."""
        if not self.root.is_dir():
            return
        for name in sorted({*self.names_on_disk(), *self.entries}):
            async with self.lock:
                await self._reconcile(name, None, retry=False)

    async def watch(self, seconds: float) -> None:
        """poll(), every `seconds`, for ever (the app's lifespan cancels it)."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.poll()
            except Exception:
                log.exception("polling the model repository failed; trying again in %g s", seconds)

    async def close(self) -> None:
        for model in [m for entry in self.entries.values() for m in entry.versions.values()]:  # a load may go on
            await model.close()
        await asyncio.gather(*self.unloading.values(), return_exceptions=True)

    async def _reconcile_alone(self, name: str, config: ModelConfig | None, retry: bool) -> Entry | None:
        async with self.lock:
            return await self._reconcile(name, config, retry)

    async def _reconcile(self, name: str, config: ModelConfig | None, retry: bool) -> Entry | None:
        model_dir = self.root / name
        if not self.root.is_dir() or name not in self.names_on_disk():  # never a path: "..", "a/b"
            self._retire_all(name)
            return None
        entry = self.entries.get(name) or Entry(name)
        try:
            dirs = version_dirs(model_dir)
            wanted = (config or read_model_config(model_dir)).version_policy.select(list(dirs))
            if not wanted:
                raise ValueError(f"{name}: no version folder that its version policy serves (present: {sorted(dirs)})")
        except (OSError, ValueError) as exc:  # what serves, serves on
            reason = _reason(exc, self.root)
            if reason != entry.reason:  # told once, not at every poll
                log.error("model %s: %s", name, reason)
            entry.reason = reason
            self.entries[name] = entry
            return entry
        entry.reason = None
        for version in wanted:
            await self._load_version(entry, dirs[version], retry)
        if not any(v in entry.failures for v in wanted):  # a load that failed changes nothing of what serves
            for version in [v for v in entry.versions if v not in wanted]:
                self._retire(entry.versions.pop(version))
        for version in [v for v in entry.failures if v not in wanted]:
            self.on_unloaded(entry.failures.pop(version))
        self.entries[name] = entry
        return entry

    async def _load_version(self, entry: Entry, version_dir: Path, retry: bool) -> None:
        version = int(version_dir.name)
        serving, failed = entry.versions.get(version), entry.failures.get(version)
        files = fingerprint(version_dir)
        if (serving and serving.fingerprint == files) or (failed and failed.fingerprint == files and not retry):
            return
        self.loading.add((entry.name, version))
        try:
            model = await asyncio.to_thread(load_measured, version_dir, self.settings, self.checks)
        finally:
            self.loading.discard((entry.name, version))
        if model.state != "ready":
            entry.failures[version] = model
            if serving is None:
                self.on_loaded(model)  # its readiness, 0
            else:
                log.error("model %s v%s keeps serving its earlier files", entry.name, version)
            return
        entry.failures.pop(version, None)
        entry.versions[version] = model
        self.on_loaded(model)
        if serving is not None:
            self._retire(serving)

    def _retire_all(self, name: str) -> None:
        """The model out of the lookup, its versions draining (their tasks in `unloading`)."""
        entry = self.entries.pop(name, None)
        self.required.discard(name)
        if entry is None:
            return
        for failed in entry.failures.values():
            self.on_unloaded(failed)
        for version in list(entry.versions):
            self._retire(entry.versions.pop(version))

    def _background(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A task of the registry's, whoever awaits it or leaves (the loop keeps only a weak reference to a task)."""
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _serves(self, name: str, version: int) -> bool:
        entry = self.entries.get(name)
        return entry is not None and version in entry.versions

    def _retire(self, model: ServedModel) -> asyncio.Task[None]:
        """The version's sessions freed once no request holds it (it has left the lookup already)."""
        key = (model.name, model.version, id(model))
        task = asyncio.create_task(self._drain_and_close(model))
        self.unloading[key] = task
        task.add_done_callback(lambda _: self.unloading.pop(key, None))
        return task

    async def _drain_and_close(self, model: ServedModel) -> None:
        deadline = time.monotonic() + self.settings.request_timeout_s + DRAIN_GRACE_S
        while model.leases and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if model.leases:
            log.warning("model %s v%s unloaded with %d requests still on it", model.name, model.version, model.leases)
        if not self._serves(model.name, model.version):  # reloaded in place, the series are the new copy's
            self.on_unloaded(model)
        await model.close()
        if model.leases:  # past the deadline: what its last requests hold (failing now) is collected once they end
            self._background(_collect_when_free(model))
        del model
        collect()

    # the repository index (Triton's) ---------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Every model folder and version: READY, LOADING, UNLOADING or UNAVAILABLE (with the reason)."""
        rows: list[dict[str, Any]] = []
        names = sorted({*self.names_on_disk(), *self.entries}) if self.root.is_dir() else sorted(self.entries)
        for name in names:
            entry = self.entries.get(name)
            found: dict[int, tuple[str, str | None]] = {v: ("READY", None) for v in entry.versions} if entry else {}
            for v, failed in entry.failures.items() if entry else ():
                found.setdefault(v, ("UNAVAILABLE", failed.reason))
            found.update({v: ("LOADING", None) for n, v in self.loading if n == name})
            for unloading, version, _ in self.unloading:
                if unloading == name:
                    found.setdefault(version, ("UNLOADING", None))
            if not found:
                why = entry.shown().reason if entry else "unloaded"
                rows.append({"name": name, "version": "", "state": "UNAVAILABLE", "reason": why})
            for version, (state, reason) in sorted(found.items()):
                rows.append({"name": name, "version": str(version), "state": state, "reason": reason or ""})
        return [row for row in rows if row["state"] == "READY" or not ready_only]
