"""vitserve's client side: `vitserve.client` (sync and async clients of the /v1 API) and the
`vitserve` command line (`vitserve.cli`). Nothing here imports the server until a command needs it."""

from vitserve.client import (
    AsyncClient,
    Client,
    EndpointMissing,
    Unreachable,
    VitserveError,
)

__all__ = ["AsyncClient", "Client", "EndpointMissing", "Unreachable", "VitserveError"]
