"""Failed authentication is limited per client address, through a real ``whisperctl serve``: the
address is the peer's, or the one a trusted proxy put in X-Forwarded-For, and nobody else's
mistakes, nor any number of good requests, ever limit a client."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from starlette.requests import Request

from gateway.ratelimit import FailedAuthLimiter, client_key
from tests.fixtures.server import Server
from transcription.errors import TooManyRequests, Unauthenticated
from transcription.settings import GatewaySettings

LIMIT = 5
WINDOW = 60
WRONG = "wt_" + "x" * 32


def limited(**extra: str) -> dict[str, str]:
    """The limit under test, answered at once (the delay has tests of its own)."""
    return {
        "WHISPER_AUTH_FAILURE_LIMIT": str(LIMIT),
        "WHISPER_AUTH_FAILURE_WINDOW_SECONDS": str(WINDOW),
        "WHISPER_AUTH_FAILURE_DELAY": "0",
        **extra,
    }


#: One connection pool for every call: a new client per request costs more than the request.
HTTP = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=64))


def call(
    server: Server, token: str, *, client: str | None = None, path: str = "/v1/credits"
) -> httpx.Response:
    """GET ``path`` with ``token``; ``client`` is the address a proxy says it forwards for."""
    headers = {"Authorization": f"Bearer {token}"}
    if client is not None:
        headers["X-Forwarded-For"] = client
    return HTTP.get(server.base_url + path, headers=headers)


def assert_rate_limited(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limited"
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(response.headers["Retry-After"]) <= WINDOW


def admin_token(server: Server) -> str:
    return server.env["WHISPER_ADMIN_TOKEN"]


def test_wrong_codes_from_one_client_lock_out_that_client_only(start_server: Any) -> None:
    """Behind a trusted proxy, the forwarded address is the one counted: after LIMIT wrong codes
    it gets 429 (even with a right code, so a guess cannot be confirmed), while other clients
    behind the same proxy, and the proxy itself, carry on."""
    server = start_server(env=limited(WHISPER_TRUSTED_PROXIES="127.0.0.1"))
    code = server.create_code()
    attacker, neighbour = "203.0.113.7", "198.51.100.9"

    statuses = [call(server, WRONG, client=attacker).status_code for _ in range(LIMIT)]
    assert statuses == [401] * LIMIT
    assert_rate_limited(call(server, WRONG, client=attacker))
    assert_rate_limited(call(server, code, client=attacker))
    # The proxy keeps appending; only the address it adds counts, not what the client wrote.
    assert_rate_limited(call(server, code, client=f"192.0.2.1, {attacker}"))

    assert call(server, WRONG, client=neighbour).status_code == 401
    assert call(server, code, client=neighbour).status_code == 200
    assert call(server, code).status_code == 200  # the proxy's own address


def test_wrong_admin_tokens_count_too(start_server: Any) -> None:
    server = start_server(env=limited(WHISPER_TRUSTED_PROXIES="127.0.0.1"))
    guesser = "203.0.113.8"
    statuses = [
        call(server, f"guess-{n}", client=guesser, path="/v1/admin/codes").status_code
        for n in range(LIMIT)
    ]
    assert statuses == [401] * LIMIT
    assert_rate_limited(call(server, admin_token(server), client=guesser, path="/v1/admin/codes"))
    # Wrong codes and wrong tokens share one allowance per address.
    assert_rate_limited(call(server, WRONG, client=guesser))
    assert call(server, admin_token(server), path="/v1/admin/codes").status_code == 200


def test_forwarded_for_is_ignored_from_an_untrusted_peer(start_server: Any) -> None:
    """With no trusted proxies (the default) X-Forwarded-For is the client's own claim: a
    guesser cannot dodge the limit by writing a new address into it on every request."""
    server = start_server(env=limited())
    statuses = [call(server, WRONG, client=f"203.0.113.{n}").status_code for n in range(LIMIT + 2)]
    assert statuses == [401] * LIMIT + [429] * 2


def test_a_flood_of_wrong_codes_is_mostly_refused_and_good_clients_are_never_limited(
    start_server: Any,
) -> None:
    """The issue's flood: hundreds of wrong codes at once from one address. Only about LIMIT
    reach the code lookup (a few more while the first are in flight), the rest get 429; a
    client with a good code makes many more requests than LIMIT throughout, all answered."""
    server = start_server(env=limited(WHISPER_TRUSTED_PROXIES="127.0.0.1"))
    code = server.create_code()
    flood, parallel = 400, 16
    with ThreadPoolExecutor(parallel + 1) as pool:
        honest = pool.submit(
            lambda: [call(server, code, client="198.51.100.20").status_code for _ in range(40)]
        )
        started = time.monotonic()
        answers = Counter(
            pool.map(lambda _: call(server, WRONG, client="203.0.113.9").status_code, range(flood))
        )
        elapsed = time.monotonic() - started
        assert honest.result() == [200] * 40
    assert set(answers) == {401, 429}, answers
    assert LIMIT <= answers[401] <= LIMIT + parallel, answers
    print(f"{flood} wrong codes in {elapsed:.2f} s: {dict(answers)}")


def timed(server: Server, token: str, **kwargs: Any) -> tuple[int, float]:
    started = time.monotonic()
    status = call(server, token, **kwargs).status_code
    return status, time.monotonic() - started


def test_refused_credentials_are_answered_late_and_good_ones_at_once(start_server: Any) -> None:
    """A wrong code, a wrong admin token and a refusal under the limit each wait the delay;
    a missing code, a good code and another address's requests do not."""
    delay = 0.6
    server = start_server(
        env=limited(WHISPER_AUTH_FAILURE_DELAY=str(delay), WHISPER_TRUSTED_PROXIES="127.0.0.1")
    )
    code = server.create_code()
    guesser = "203.0.113.12"
    wrong = [timed(server, WRONG, client=guesser) for _ in range(2)]
    wrong.append(timed(server, "guess", client=guesser, path="/v1/admin/codes"))
    assert [status for status, _ in wrong] == [401] * 3
    assert all(seconds >= delay for _, seconds in wrong), wrong
    for _ in range(LIMIT - 3):
        call(server, WRONG, client=guesser)
    status, seconds = timed(server, code, client=guesser)
    assert (status, seconds >= delay) == (429, True), seconds

    good = [timed(server, code, client="198.51.100.21") for _ in range(5)]
    assert [status for status, _ in good] == [200] * 5
    assert max(seconds for _, seconds in good) < delay, good
    missing = HTTP.get(server.base_url + "/v1/credits")
    assert missing.status_code == 401
    assert missing.elapsed.total_seconds() < delay


def test_a_guesser_gets_one_answer_per_connection_per_delay(start_server: Any) -> None:
    """16 connections asking again the moment they are answered, for 3 s: with a 1 s delay
    they get about 16 x 3 answers, not the thousands the gateway could serve, while a good
    client's requests, interleaved, are answered at once."""
    server = start_server(
        env=limited(WHISPER_AUTH_FAILURE_DELAY="1", WHISPER_TRUSTED_PROXIES="127.0.0.1")
    )
    code = server.create_code()
    parallel, seconds = 16, 3.0
    deadline = time.monotonic() + seconds

    def guess(_: int) -> int:
        answers = 0
        while time.monotonic() < deadline:
            call(server, WRONG, client="203.0.113.13")
            answers += 1
        return answers

    with ThreadPoolExecutor(parallel) as pool:
        answers = sum(pool.map(guess, range(parallel)))
        good = [timed(server, code, client="198.51.100.22") for _ in range(10)]
    assert answers <= parallel * (seconds + 1), answers
    assert [status for status, _ in good] == [200] * 10
    assert max(t for _, t in good) < 1.0, good


def request_from(host: str) -> Request:
    return Request({"type": "http", "client": (host, 40000), "headers": []})


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::2", "2001:db8:1:2::/64"),
        ("testclient", "testclient"),
    ],
)
def test_an_ipv6_client_is_one_client_across_its_64(host: str, key: str) -> None:
    assert client_key(request_from(host)) == key


def test_the_window_moves_and_retry_after_says_when() -> None:
    """A failure counts for one window; Retry-After is when the oldest one stops counting."""
    limiter = FailedAuthLimiter(2, 2)
    request = request_from("203.0.113.10")
    for _ in range(2):
        with pytest.raises(Unauthenticated), limiter.attempt(request):
            raise Unauthenticated("wrong")
    with pytest.raises(TooManyRequests) as refused, limiter.attempt(request):
        pass
    assert refused.value.retry_after in (1, 2)
    deadline = time.monotonic() + 10
    while True:
        try:
            with limiter.attempt(request):
                break
        except TooManyRequests:
            assert time.monotonic() < deadline, "the window never moved on"
            time.sleep(0.1)


def test_success_never_counts_and_zero_turns_the_limit_off() -> None:
    request = request_from("203.0.113.11")
    limiter = FailedAuthLimiter(1, 60)
    for _ in range(100):
        with limiter.attempt(request):
            pass
    off = FailedAuthLimiter(0, 60)
    for _ in range(100):
        with pytest.raises(Unauthenticated), off.attempt(request):
            raise Unauthenticated("wrong")


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    """A typo fails at startup instead of matching no peer, as uvicorn would take it."""
    settings = GatewaySettings(trusted_proxies=" 35.191.0.0/16, 130.211.0.0/22,10.1.2.3 ")
    assert settings.trusted_proxies == ["35.191.0.0/16", "130.211.0.0/22", "10.1.2.3/32"]
    with pytest.raises(ValidationError, match="loadbalancer"):
        GatewaySettings(trusted_proxies="35.191.0.0/16,loadbalancer")
