"""The rate limiter on its own (service/ratelimit.py): token buckets on a fake clock, how a client is
named, and the cap on the buckets it keeps."""

from __future__ import annotations

import tracemalloc

import pytest

from service.grpc_server import peer_host
from service.ratelimit import RateLimited, RateLimiter, ip_block, limiter_for
from service.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_the_rate_refills_it() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.wait("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.wait("a") == pytest.approx(0.5)  # a token every 0.5 s
    clock.now += 0.25
    assert limiter.wait("a") == pytest.approx(0.25)  # refused calls take nothing
    clock.now += 0.25
    assert limiter.wait("a") == 0 and limiter.wait("a") > 0
    clock.now += 60  # a long pause refills the bucket to the burst, no further
    assert [limiter.wait("a") for _ in range(4)][-2:] == [0, pytest.approx(0.5)]


def test_clients_have_buckets_of_their_own() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=Clock())
    assert limiter.wait("a") == 0 and limiter.wait("a") > 0
    assert limiter.wait("b") == 0


def test_check_raises_with_whole_seconds_to_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=0.4, burst=1, clock=clock)  # a token every 2.5 s
    limiter.check(b"", "10.0.0.1")
    with pytest.raises(RateLimited) as refused:
        limiter.check(b"", "10.0.0.1")
    assert (refused.value.status, refused.value.code, refused.value.retry_after) == (429, "rate_limited", 3)
    assert refused.value.headers == {"Retry-After": "3"}
    clock.now += 2.4
    with pytest.raises(RateLimited) as soon:
        limiter.check(b"", "10.0.0.1")
    assert soon.value.retry_after == 1  # 0.1 s: at least 1


def test_a_known_key_names_the_client_hashed_else_the_address() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, keys=[b"s3cret", None], clock=Clock())
    by_key = limiter.client(b"s3cret", "10.0.0.1")
    assert by_key.startswith("key:") and "s3cret" not in by_key
    assert limiter.client(b"s3cret", "10.0.0.2") == by_key  # one key, whatever its address
    assert limiter.client(b"made-up", "10.0.0.1") == limiter.client(b"", "10.0.0.1") == "ip:10.0.0.1"
    limiter.check(b"s3cret", "10.0.0.1")
    limiter.check(b"", "10.0.0.1")  # the address has a bucket of its own
    assert all("s3cret" not in name for name in limiter.buckets)


@pytest.mark.parametrize(
    ("host", "block"),
    [("192.0.2.7", "192.0.2.7"), ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"), ("::ffff:192.0.2.7", "192.0.2.7"),
     ("testclient", "testclient"), (None, "-")],
)  # fmt: skip
def test_an_ipv6_client_is_its_64(host: str | None, block: str) -> None:
    assert ip_block(host) == block


def test_the_buckets_kept_are_capped_the_longest_idle_forgotten() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=1_000, clock=clock)
    limiter.wait("busy")
    tracemalloc.start()
    for n in range(10_000):
        if n % 100 == 0:
            assert limiter.wait("busy") > 0  # used recently: kept, still limited
        limiter.wait(f"key:{n:064x}")
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(limiter.buckets) == 1_000 and "key:0" not in limiter.buckets and "busy" in limiter.buckets
    assert held < 400 * 1_000  # about 300 bytes a bucket (as settings.py says), not 10,000 of them


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:192.0.2.7:5000", "192.0.2.7"),
        ("ipv6:%5B2001:db8::1%5D:5000", "2001:db8::1"),
        ("unix:/run/s", "unix:/run/s"),
    ],
)
def test_a_grpc_peer_gives_its_address(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_settings_make_the_limiter() -> None:
    assert limiter_for(Settings()) is None  # off by default
    limiter = limiter_for(Settings(rate_limit=2.5, api_key="k"))
    assert limiter is not None and (limiter.rate, limiter.burst, limiter.max_clients) == (2.5, 3, 10_000)
    assert limiter.client(b"k", None).startswith("key:")
    limiter = limiter_for(Settings(rate_limit=0.1, rate_burst=5, rate_limit_clients=7))
    assert limiter is not None and (limiter.burst, limiter.max_clients) == (5, 7)
    with pytest.raises(ValueError):
        RateLimiter(rate=1.0, burst=0)
