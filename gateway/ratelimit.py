"""Failed authentication limited per client address, so guessing codes or the admin token is
slow while good credentials are never counted. Counts live in this process's memory, so in the
cluster shape the limit holds per gateway replica.

Each refused credential is also answered late (``delay``, as PAM's ``pam_faildelay`` does), so a
guesser that ignores ``Retry-After`` and asks again at once gets one answer per connection per
delay instead of as many as the gateway can serve; waiting costs an idle coroutine, not a thread.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.requests import Request

from transcription.errors import AdminRequired, TooManyRequests, Unauthenticated

#: A client that holds an IPv6 address usually holds its whole /64; counting per address would
#: give it 2**64 allowances.
IPV6_PREFIX = 64


def client_key(request: Request) -> str:
    """The address that failures are counted against: the peer, or the client a trusted proxy
    named (ProxyHeadersMiddleware has already put it in the scope), IPv6 by its /64."""
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:255]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/{IPV6_PREFIX}", strict=False))
    return str(address)


class FailedAuthLimiter:
    """A moving window of failed authentications per client address; ``limit`` 0 turns it off.
    A refused credential's answer waits ``delay`` seconds (see :func:`penalty`)."""

    def __init__(self, limit: int, window_seconds: int, delay: float = 0.0) -> None:
        self._item = RateLimitItemPerSecond(limit, window_seconds) if limit else None
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self.delay = delay

    @contextmanager
    def attempt(self, request: Request) -> Iterator[None]:
        """Refuse an address that used up its failures before its credentials are even looked
        at (so a right guess is refused too), and count the attempt if they are wrong."""
        if self._item is None:
            try:
                yield
            except (Unauthenticated, AdminRequired):
                self._penalise(request)
                raise
            return
        key = client_key(request)
        if not self._limiter.test(self._item, key):
            self._penalise(request)
            reset, _ = self._limiter.get_window_stats(self._item, key)
            wait = max(1, math.ceil(reset - time.time()))
            raise TooManyRequests(
                f"Too many failed authentications from your address; retry in {wait} s.",
                retry_after=wait,
            )
        try:
            yield
        except (Unauthenticated, AdminRequired):
            self._limiter.hit(self._item, key)
            self._penalise(request)
            raise

    def _penalise(self, request: Request) -> None:
        request.state.auth_penalty = self.delay


def penalty(request: Request) -> float:
    """Seconds the answer to this request waits because it presented a refused credential."""
    return float(getattr(request.state, "auth_penalty", 0.0))
