"""The request context: who asked (request id), which model answered, and how long each stage
took (decode, preprocess, queue, inference, postprocess, encode). It travels in a context variable,
so worker threads and the batcher record into the request that asked without being passed around.
A leaf module: it imports nothing from the service, and everything may import it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field

Timings = dict[str, float]  # stage -> seconds, summed when a stage repeats
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


def current() -> Timings | None:
    context = _current.get()
    return context.timings if context else None


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


def record(stage: str, seconds: float, timings: Timings | None = None) -> None:
    timings = timings if timings is not None else current()
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + seconds


@contextmanager
def timed(stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        record(stage, time.perf_counter() - started)
