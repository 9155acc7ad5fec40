"""The service as a Ray Serve application: each replica runs the service's own FastAPI app
(`create_app`), so every route, the batchers and the limits are the same; Ray's proxy spreads the
requests among the replicas and replaces one that dies.

Settings come from the environment, as for `python -m service` (serve.yaml sets them in its
`runtime_env`). Nothing in service/ imports Ray: this module is the only bridge."""

from __future__ import annotations

import os

import ray
from fastapi import FastAPI
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.app import create_app
from service.settings import Settings

REPLICA_HEADER = b"x-vitserve-replica"  # "<replica id> <pid>": which replica answered (tests, debugging)


class ReplicaHeader:
    """Names the replica on every response."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.value = f"{replica} {os.getpid()}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self.value)]
            await send(message)

        await self.app(scope, receive, named)


@serve.deployment(name="vitserve")
@serve.ingress()
class VitServe:
    """One replica. The app is built here, in the replica, not pickled from the driver: it holds
    locks and threads; Ray then runs its lifespan, which loads and warms every model before the
    replica takes traffic."""

    def __init__(self) -> None:
        settings = Settings()
        if "VITSERVE_INTRA_OP_THREADS" not in os.environ:
            # the cores Ray gave this replica (num_cpus), not the host's: replicas share a node
            cores = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
            settings = settings.model_copy(update={"intra_op_threads": max(1, int(cores) - 1)})
        self.settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.settings)
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app


app = VitServe.bind()
