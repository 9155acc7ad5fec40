"""Per-client rate limits: a token bucket per client, `rate` tokens a second up to `burst`, one
token per request. Framework-free: the HTTP middleware (service/http_limits.py) and the gRPC server
(service/grpc_server.py) pass each request's key and address to the one `RateLimiter` the app holds.

A client is its API key where the request carries one the service knows (as a SHA-256 digest: the
key itself is neither kept nor logged), else its IP address (an IPv6 address by its /64, what one
host is usually given). The buckets are an LRU of at most `max_clients`: a flood of new clients
evicts the longest idle, which at worst starts over with a full bucket. Each process has its own
buckets: with N workers a client may get up to N times the rate."""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from service.errors import ServiceError
from service.settings import Settings

MAX_CLIENTS = 10_000  # default cap on the buckets held: each takes about 300 bytes


class RateLimited(ServiceError):
    def __init__(self, retry_after: int) -> None:
        message = f"too many requests from this client; retry after {retry_after} s"
        super().__init__(429, "rate_limited", message, {"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class RateLimiter:
    """Token buckets by client (see the module's doc). `keys`: the API keys the service knows;
    `clock` (seconds, monotonic) is replaceable for tests."""

    def __init__(self, rate: float, burst: int, max_clients: int = MAX_CLIENTS, keys: Iterable[bytes | None] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        if rate <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("need rate > 0, burst >= 1 and max_clients >= 1")
        self.rate, self.burst, self.max_clients, self.clock = rate, burst, max_clients, clock
        self.digests = {digest(key) for key in keys if key}
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, when)

    def check(self, presented_key: bytes, host: str | None) -> None:
        """Takes a token for the request's client, or raises RateLimited with the whole seconds until it has one."""
        if (wait := self.wait(self.client(presented_key, host))) > 0:
            raise RateLimited(max(1, math.ceil(wait)))

    def client(self, presented_key: bytes, host: str | None) -> str:
        """`key:<digest>` for a key the service knows, else `ip:<address>` (see ip_block)."""
        if presented_key and (hashed := digest(presented_key)) in self.digests:
            return f"key:{hashed}"
        return f"ip:{ip_block(host)}"

    def wait(self, client: str) -> float:
        """Takes a token for `client` and returns 0, or returns the seconds until it has one (taking nothing)."""
        now = self.clock()
        tokens, then = self.buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self.buckets[client] = (tokens - 1 if wait == 0 else tokens, now)  # the most recently used last
        if len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        return wait


def digest(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


def ip_block(host: str | None) -> str:
    """The address a client is limited by: an IPv4 address as it is, an IPv6 address's /64 (one
    host's usual share, which it could otherwise rotate through), anything else (a Unix socket,
    no address) as given."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return host or "-"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def limiter_for(settings: Settings) -> RateLimiter | None:
    """The limiter the settings ask for (burst 0: one second's worth), or None where the rate is 0 (off)."""
    if settings.rate_limit == 0:
        return None
    keys = (k.get_secret_value().encode() for k in (settings.api_key, settings.control_api_key) if k is not None)
    burst = settings.rate_burst or max(1, math.ceil(settings.rate_limit))
    return RateLimiter(settings.rate_limit, burst, settings.rate_limit_clients, keys)
