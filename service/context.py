"""The request context: who asked (request id), which model answered, and how long each stage
took (decode, preprocess, queue, inference, postprocess, encode). It travels in a context variable,
so worker threads and the batcher record into the request that asked without being passed around.
Where tracing is on (service/tracing.py), each stage's start and end are kept as well, for its span.
A leaf module: it imports nothing from the service, and everything may import it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field

Timings = dict[str, float]  # stage -> seconds, summed when a stage repeats
# (stage, start, end) in time.perf_counter() seconds, and what the stage's span links to (a batch run's span)
Stage = tuple[str, float, float, object]
# the scope key set when a connection closes before its answer is complete (by service/connections.py, or
# by service/errors.py on a ClientDisconnect): the status and note the access line shows instead of the answer's
CLOSED_EARLY = "vitserve.closed_early"
CLIENT_LEFT = (499, "the client left before its answer")  # 499: nginx's "client closed request"


@dataclass(slots=True)
class RequestContext:
    request_id: str
    timings: Timings = field(default_factory=dict)
    model: str = ""
    provider: str = ""
    version: int = 0
    releases: list[Callable[[], None]] = field(default_factory=list)  # called when the request ends
    stages: list[Stage] | None = None  # every stage as it ran, kept only where the request is traced
    trace: object = None  # the request's span and what goes with it (service/tracing.py), where it is traced


_current: ContextVar[RequestContext | None] = ContextVar("request_context", default=None)
_in_flight = 0  # requests begun and not yet ended, in this process


def begin(request_id: str) -> tuple[RequestContext, Token[RequestContext | None]]:
    """A new context for this request; pass the token to `end`."""
    global _in_flight
    _in_flight += 1
    context = RequestContext(request_id)
    return context, _current.set(context)


def end(token: Token[RequestContext | None]) -> None:
    global _in_flight
    _in_flight -= 1
    context = _current.get()
    _current.reset(token)
    if context is not None:  # emptied: a context that outlives its request (a task's copy) holds no model
        releases, context.releases = context.releases, []
        for release in releases:
            release()


def in_flight() -> int:
    return _in_flight


def current() -> RequestContext | None:
    return _current.get()


def request_id() -> str | None:
    context = _current.get()
    return context.request_id if context else None


Lease = Callable[[], Callable[[], None]]  # takes a hold on something; returns its release


def served_by(model: str, provider: str, version: int = 0, lease: Lease | None = None) -> None:
    """Labels this request's metrics with the model (its version and execution provider) that answered
    it; `lease` takes a hold on the model that the request keeps until it ends."""
    context = _current.get()
    if context is not None:
        context.model, context.provider, context.version = model, provider, version
        if lease is not None:
            context.releases.append(lease())


def record(
    stage: str, seconds: float, request: RequestContext | None = None, ended: float | None = None, link: object = None
) -> None:
    """Adds `seconds` to the stage's time in `request` (default: the current one); where the request is
    traced, keeps the stage's start and end too (`ended`: when it ended, default now; `link`: the span of
    the batch run it was part of)."""
    request = request if request is not None else _current.get()
    if request is not None:
        request.timings[stage] = request.timings.get(stage, 0.0) + seconds
        if request.stages is not None:
            end = time.perf_counter() if ended is None else ended
            request.stages.append((stage, end - seconds, end, link))


@contextmanager
def timed(stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        record(stage, time.perf_counter() - started)
