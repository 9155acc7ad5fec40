"""Many processes on one host: `python -m service --workers N`.

The parent binds the port and spawns N workers, each loading the models itself and serving the
shared socket (the kernel spreads connections among them). Prometheus metrics add up across the
workers (prometheus-client's multiprocess mode, through files in a folder of the parent's); SIGTERM
is passed to every worker, which drains as a single process does; a worker that dies is replaced."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.process import BaseProcess
from types import FrameType

import uvicorn

from service import logs
from service.metrics import MULTIPROCESS_DIR, worker_gone
from service.server import build_server
from service.settings import Settings

log = logging.getLogger("service")
STARTUP_FAILURE = 3  # uvicorn's exit code for an app that could not start: restarting would not help


def supervise(settings: Settings) -> None:
    """Runs the workers until SIGTERM or SIGINT, then waits for each to drain and exit."""
    folder = tempfile.mkdtemp(prefix="vitserve-metrics-")
    os.environ[MULTIPROCESS_DIR] = folder  # before any worker starts: they read it as they import
    # bound as uvicorn binds (IPv4 or 6, SO_REUSEADDR); the app named here is never loaded
    listening = uvicorn.Config(app="unused", host=settings.host, port=settings.port).bind_socket()
    spawn = multiprocessing.get_context("spawn")
    workers = [_start(spawn, settings, listening) for _ in range(settings.workers)]
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("%d workers serving http://%s:%d", settings.workers, settings.host, settings.port)
    try:
        while not stopping:
            time.sleep(0.2)
            for index, worker in enumerate(workers):
                if worker.is_alive() or stopping:
                    continue
                worker_gone(worker.pid or 0)
                if worker.exitcode == STARTUP_FAILURE:
                    log.error("a worker could not start (exit %d): stopping", STARTUP_FAILURE)
                    stopping = True
                    break
                log.error("worker %s exited (%s); starting another", worker.pid, worker.exitcode)
                workers[index] = _start(spawn, settings, listening)
    finally:
        for worker in workers:  # each drains: readiness 503, then finishes what it accepted
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)
        for worker in workers:
            worker.join()
        listening.close()
        shutil.rmtree(folder, ignore_errors=True)
    # a worker stopped by the signal while it was still loading has nothing to drain: only errors count
    if failed := [worker.exitcode for worker in workers if worker.exitcode and worker.exitcode > 0]:
        raise SystemExit(max(failed))


def _start(spawn: multiprocessing.context.SpawnContext, settings: Settings, listening: socket.socket) -> BaseProcess:
    worker = spawn.Process(target=_serve, args=(settings, listening), name="vitserve-worker")
    worker.start()
    return worker


def _serve(settings: Settings, listening: socket.socket) -> None:
    """One worker: the single-process server on the shared socket."""
    logs.configure(settings.log_level, settings.log_json)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the workers
    build_server(settings).run(sockets=[listening])
