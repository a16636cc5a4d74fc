"""The pure parts of the device-list resync endpoint and the admin view of device lists:
user-ID and server-name grammar, path parsing, the per-requester token bucket, the per-user
cooldown, single-flight bookkeeping, the wording of failures and their stored form, and
reading Synapse's backoff record. Time is an argument everywhere, so no clock is needed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_xsign_uia._synapse.device_list_state import Destination, RemoteUser, _on_server
from synapse_xsign_uia._synapse.device_lists import (
    FailureReason,
    ResyncFailure,
    _classify_by_backoff,
    _key_ids,
    classify_fetch_error,
)
from synapse_xsign_uia.outcomes import ResyncOutcome
from synapse_xsign_uia.resync import (
    REASON_FIELD,
    REMOTE_STATUS_FIELD,
    Cooldown,
    Outcome,
    RateLimiter,
    SingleFlight,
    failure_error,
    route_user_segment,
)
from synapse_xsign_uia.resync.service import failure_fields, stored_failure
from synapse_xsign_uia.user_ids import (
    InvalidServerName,
    InvalidUserId,
    check_server_name,
    parse_user_id,
)
from synapse_xsign_uia.user_ids import decode_path_segment as decode_user_segment

# --- User IDs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user_id", "server_name"),
    [
        ("@alice:example.org", "example.org"),
        ("@alice:localhost:8448", "localhost:8448"),
        ("@alice:127.0.0.1", "127.0.0.1"),
        ("@alice:[::1]", "[::1]"),
        ("@alice:[2001:db8::1]:8448", "[2001:db8::1]:8448"),
        ("@Alice.Old=Style+id/x:matrix.org", "matrix.org"),
        ("@a:b", "b"),
        ("@a:host:1", "host:1"),
        ("@a:host:65535", "host:65535"),
    ],
)
def test_valid_user_ids(user_id: str, server_name: str) -> None:
    assert parse_user_id(user_id) == server_name


@pytest.mark.parametrize(
    "user_id",
    [
        "",
        "alice",
        "alice:example.org",
        "#room:example.org",
        "@alice",
        "@:example.org",
        "@alice:",
        "@al ice:example.org",
        "@é:example.org",
        "@alice\x00:example.org",
        "@alice:exa_mple.org",
        "@alice:example.org:",
        "@alice:example.org:0",
        "@alice:example.org:65536",
        "@alice:example.org:80a",
        "@alice:[::1",
        "@alice:[::1]x",
        "@alice:[not-ipv6]",
        "@alice:exam ple.org",
        "@" + "a" * 250 + ":example.org",
    ],
)
def test_invalid_user_ids(user_id: str) -> None:
    with pytest.raises(InvalidUserId) as info:
        parse_user_id(user_id)
    assert "user ID" in str(info.value)


def test_user_id_length_counts_bytes() -> None:
    localpart = "a" * (255 - len("@:example.org"))
    assert parse_user_id(f"@{localpart}:example.org") == "example.org"
    with pytest.raises(InvalidUserId):
        parse_user_id(f"@{localpart}a:example.org")


@given(st.text(max_size=40))
def test_parse_user_id_never_crashes(text: str) -> None:
    try:
        server_name = parse_user_id(text)
    except InvalidUserId:
        return
    assert text.endswith(":" + server_name)


# --- The path ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("postpath", "segment"),
    [
        ([b"%40a%3Ab", b"devices"], b"%40a%3Ab"),
        ([b"@a:b", b"devices"], b"@a:b"),
        ([b"@a:b"], None),
        ([b"@a:b", b"devices", b""], None),
        ([b"@a:b", b"devices", b"x"], None),
        ([b"@a:b", b"keys"], None),
        ([b"", b"devices"], None),
        ([], None),
        (None, None),
    ],
)
def test_route_user_segment(postpath: list[bytes] | None, segment: bytes | None) -> None:
    assert route_user_segment(postpath) == segment


def test_decode_user_segment() -> None:
    assert decode_user_segment(b"%40alice%3Aexample.org") == "@alice:example.org"
    assert decode_user_segment(b"@alice:example.org") == "@alice:example.org"
    # An encoded slash is part of the segment, not a path separator.
    assert decode_user_segment(b"%40a%2Fb%3Ac") == "@a/b:c"
    assert decode_user_segment(b"%40%C3%A9%3Ac") == "@é:c"
    with pytest.raises(InvalidUserId):
        decode_user_segment(b"%FF%FE")


# --- Rate limiter -----------------------------------------------------------------------


def test_burst_then_limited() -> None:
    limiter: RateLimiter[str] = RateLimiter(rate_per_second=0.2, burst_count=5)
    assert [limiter.take("u", 0) for _ in range(5)] == [None] * 5
    # One token comes back every 5 s.
    assert limiter.take("u", 0) == 5000
    assert limiter.take("u", 1000) == 4000
    assert limiter.take("u", 5000) is None
    assert limiter.take("u", 5000) == 5000


def test_keys_have_their_own_buckets() -> None:
    limiter: RateLimiter[str] = RateLimiter(rate_per_second=1, burst_count=1)
    assert limiter.take("a", 0) is None
    assert limiter.take("a", 0) == 1000
    assert limiter.take("b", 0) is None


def test_bucket_refills_only_to_burst() -> None:
    limiter: RateLimiter[str] = RateLimiter(rate_per_second=10, burst_count=2)
    assert limiter.take("u", 0) is None
    # A long quiet period refills the bucket, but not beyond the burst.
    assert limiter.take("u", 10**9) is None
    assert limiter.take("u", 10**9) is None
    assert limiter.take("u", 10**9) == 100


def test_clock_stepping_back_gives_no_tokens() -> None:
    limiter: RateLimiter[str] = RateLimiter(rate_per_second=1, burst_count=1)
    assert limiter.take("u", 10_000) is None
    assert limiter.take("u", 0) is not None
    assert limiter.take("u", 10_000) is not None
    assert limiter.take("u", 11_000) is None


def test_fractional_rate_retry_after_rounds_up() -> None:
    limiter: RateLimiter[str] = RateLimiter(rate_per_second=3, burst_count=1)
    assert limiter.take("u", 0) is None
    assert limiter.take("u", 0) == 334


def test_idle_buckets_are_forgotten() -> None:
    limiter: RateLimiter[str] = RateLimiter(rate_per_second=1, burst_count=2)
    for i in range(1000):
        limiter.take(f"user{i}", 0)
    assert len(limiter) == 1000
    # Every bucket untouched for the refill time (2 s) is full: forgetting it changes nothing.
    limiter.take("late", 2000)
    assert len(limiter) == 1


def test_absurdly_small_rate_does_not_crash() -> None:
    year_ms = 365 * 86_400_000
    for rate in (1e-300, 5e-324):
        limiter: RateLimiter[str] = RateLimiter(rate_per_second=rate, burst_count=1)
        assert limiter.take("u", 0) is None
        assert limiter.take("u", 0) == year_ms


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_limiter_rejects_nonsense(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate_per_second=rate, burst_count=burst)


@settings(max_examples=200)
@given(
    rate=st.sampled_from([0.2, 1.0, 3.0]),
    burst=st.integers(min_value=1, max_value=8),
    gaps=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=60),
)
def test_never_more_than_burst_plus_refill(rate: float, burst: int, gaps: list[int]) -> None:
    limiter: RateLimiter[str] = RateLimiter(rate_per_second=rate, burst_count=burst)
    now = 0
    allowed = 0
    for gap in gaps:
        now += gap
        retry_after = limiter.take("u", now)
        if retry_after is None:
            allowed += 1
        else:
            assert retry_after > 0
    assert allowed <= burst + rate * now / 1000 + 1e-9


@given(
    burst=st.integers(min_value=1, max_value=5),
    wait_extra=st.integers(min_value=0, max_value=50),
)
def test_waiting_retry_after_is_enough(burst: int, wait_extra: int) -> None:
    limiter: RateLimiter[str] = RateLimiter(rate_per_second=0.2, burst_count=burst)
    for _ in range(burst):
        assert limiter.take("u", 0) is None
    retry_after = limiter.take("u", 0)
    assert retry_after is not None
    assert limiter.take("u", retry_after - 1) is not None
    assert limiter.take("u", retry_after + wait_extra) is None


# --- Cooldown ---------------------------------------------------------------------------


def test_cooldown() -> None:
    cooldown: Cooldown[str] = Cooldown(30_000)
    assert cooldown.remaining_ms("u", 0) == 0
    cooldown.start("u", 1000)
    assert cooldown.remaining_ms("u", 1000) == 30_000
    assert cooldown.remaining_ms("u", 21_000) == 10_000
    assert cooldown.remaining_ms("u", 31_000) == 0
    assert cooldown.remaining_ms("other", 1000) == 0
    # A clock that steps back never lengthens the cooldown.
    assert cooldown.remaining_ms("u", 0) == 30_000


def test_cooldown_restarts() -> None:
    cooldown: Cooldown[str] = Cooldown(1000)
    cooldown.start("u", 0)
    cooldown.start("u", 900)
    assert cooldown.remaining_ms("u", 1500) == 400


def test_expired_cooldowns_are_forgotten() -> None:
    cooldown: Cooldown[str] = Cooldown(1000)
    for i in range(500):
        cooldown.start(f"user{i}", 0)
    assert len(cooldown) == 500
    cooldown.start("late", 1000)
    assert len(cooldown) == 1
    assert cooldown.remaining_ms("late", 1000) == 1000


def test_cooldown_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Cooldown(0)


# --- Single flight ----------------------------------------------------------------------


def test_single_flight() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    assert flights.join("u", "w1") is True
    assert flights.join("u", "w2") is False
    assert flights.join("u", "w3") is False
    assert flights.join("v", "x1") is True
    flights.leave("u", "w2")
    flights.leave("u", "not-a-waiter")
    assert flights.finish("u") == ["w1", "w3"]
    # Another key's flight goes on.
    assert flights.join("v", "x2") is False
    assert flights.finish("v") == ["x1", "x2"]
    # The next request starts a new flight.
    assert flights.join("u", "w4") is True


def test_flight_outlives_its_waiters() -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    assert flights.join("u", "w1") is True
    flights.leave("u", "w1")
    # Every waiter gave up, but the fetch still runs: a newcomer joins it.
    assert flights.join("u", "w2") is False
    assert flights.finish("u") == ["w2"]
    assert flights.finish("u") == []
    assert len(flights) == 0


@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(["join", "finish"]))))
def test_one_starter_per_flight(ops: list[tuple[str, str]]) -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    open_flights: set[str] = set()
    for n, (key, op) in enumerate(ops):
        if op == "join":
            started = flights.join(key, n)
            assert started == (key not in open_flights)
            open_flights.add(key)
        else:
            flights.finish(key)
            open_flights.discard(key)


# --- How failures read ------------------------------------------------------------------


def failed(reason: str, detail: str = "x", **kwargs: int) -> Outcome:
    return Outcome(ResyncOutcome.FAILED, ResyncFailure(FailureReason(reason), detail, **kwargs))


def test_backoff_says_when() -> None:
    message, fields = failure_error(
        "@a:remote", "remote", failed("backoff", retry_at_ms=12_500), 10_000, 10_000
    )
    assert fields == {REASON_FIELD: "backoff", "retry_after_ms": 2500}
    assert "backs off from it for another 3s" in message
    assert "stays marked as stale" in message


def test_past_backoff_is_not_relayed() -> None:
    _, fields = failure_error(
        "@a:remote", "remote", failed("unreachable", retry_at_ms=5_000), 10_000, 10_000
    )
    assert fields == {REASON_FIELD: "unreachable"}


def test_remote_error_names_the_status() -> None:
    message, fields = failure_error(
        "@a:remote",
        "remote",
        failed("remote_error", "it answered HTTP 404 M_UNRECOGNIZED", remote_status=404),
        0,
        10_000,
    )
    assert fields == {REASON_FIELD: "remote_error", REMOTE_STATUS_FIELD: 404}
    assert "it answered HTTP 404 M_UNRECOGNIZED." in message


def test_client_timeout() -> None:
    message, fields = failure_error(
        "@a:remote", "remote", Outcome(ResyncOutcome.TIMED_OUT), 0, 2500
    )
    assert fields == {REASON_FIELD: "timeout"}
    assert "within 2.5s" in message
    assert "in the background" in message


@pytest.mark.parametrize("reason", ["unreachable", "timeout", "denied", "error", "remote_error"])
def test_every_reason_reads_as_a_sentence(reason: str) -> None:
    message, fields = failure_error("@a:remote", "remote", failed(reason, "detail"), 0, 1000)
    assert fields[REASON_FIELD] == reason
    assert "remote" in message
    assert ".." not in message


def test_classify_by_backoff() -> None:
    """Where this process did not see the federation request fail (on a worker), the
    destination's backoff tells what happened."""
    assert _classify_by_backoff(None, 1000).reason.value == "remote_error"
    earlier = _classify_by_backoff((500, 9000), 1000)
    assert (earlier.reason.value, earlier.retry_at_ms) == ("backoff", 9000)
    now = _classify_by_backoff((1200, 9000), 1000)
    assert (now.reason.value, now.retry_at_ms) == ("unreachable", 9000)


# --- What Synapse's federation exceptions mean ------------------------------------------


def _send_failed(inner: BaseException) -> BaseException:
    from synapse.api.errors import RequestSendFailed

    return RequestSendFailed(inner, can_retry=True)


def test_classify_backoff() -> None:
    from synapse.util.retryutils import NotRetryingDestination

    failure = classify_fetch_error(NotRetryingDestination(1000, 5000, "remote"))
    assert (failure.reason.value, failure.retry_at_ms) == ("backoff", 6000)


def test_classify_denied() -> None:
    from synapse.api.errors import FederationDeniedError

    assert classify_fetch_error(FederationDeniedError("remote")).reason.value == "denied"


def test_classify_http_errors() -> None:
    from synapse.api.errors import HttpResponseException

    not_found = HttpResponseException(404, "Not Found", b'{"errcode": "M_UNRECOGNIZED"}')
    failure = classify_fetch_error(not_found)
    assert failure == ResyncFailure(
        FailureReason.REMOTE_ERROR, "it answered HTTP 404 M_UNRECOGNIZED", remote_status=404
    )
    # Synapse wraps 5xx answers, which it retries, in RequestSendFailed.
    server_error = HttpResponseException(502, "Bad Gateway", b"<html>")
    failure = classify_fetch_error(_send_failed(server_error))
    assert failure == ResyncFailure(
        FailureReason.REMOTE_ERROR, "it answered HTTP 502 Bad Gateway", remote_status=502
    )


def test_classify_network_errors() -> None:
    from twisted.internet import defer
    from twisted.internet import error as twisted_error
    from twisted.python import failure as twisted_failure
    from twisted.web import client

    # Twisted's exception constructors are untyped.
    error: Any = twisted_error
    failure_cls: Any = twisted_failure.Failure
    never_received: Any = client.ResponseNeverReceived

    assert classify_fetch_error(_send_failed(defer.TimeoutError())).reason.value == "timeout"
    assert classify_fetch_error(_send_failed(error.TimeoutError())).reason.value == "timeout"
    refused = classify_fetch_error(_send_failed(error.ConnectionRefusedError()))
    assert refused.reason.value == "unreachable"
    assert refused.detail == "Connection was refused by other side"
    lost = never_received([failure_cls(error.ConnectionLost("the peer hung up"))])
    failure = classify_fetch_error(_send_failed(lost))
    assert failure.reason.value == "unreachable"
    assert "the peer hung up" in failure.detail


def test_classify_anything_else() -> None:
    failure = classify_fetch_error(KeyError("stream_id"))
    assert failure.reason.value == "error"


# --- Failures stored for the processes that wait for another's fetch ---------------------


@given(
    reason=st.sampled_from(FailureReason),
    detail=st.text(max_size=50),
    retry_at_ms=st.none() | st.integers(min_value=0, max_value=2**53),
    remote_status=st.none() | st.integers(min_value=100, max_value=599),
)
def test_stored_failure_round_trips(
    reason: FailureReason, detail: str, retry_at_ms: int | None, remote_status: int | None
) -> None:
    failure = ResyncFailure(reason, detail, retry_at_ms, remote_status)
    stored = json.loads(json.dumps(failure_fields(failure)))
    assert stored_failure(stored) == failure


@pytest.mark.parametrize("fields", [{}, {"reason": "gremlins", "detail": "x"}, {"detail": "x"}])
def test_unreadable_stored_failure_is_an_internal_error(fields: dict[str, Any]) -> None:
    assert stored_failure(fields).reason is FailureReason.ERROR


# --- What Synapse's tables say, for the operator -----------------------------------------


def test_a_destination_without_failures_is_reachable() -> None:
    destination = Destination("example.org", None, None, 0)
    assert destination.reachable
    assert destination.next_retry_ms is None


def test_a_failing_destination_says_when_synapse_tries_again() -> None:
    destination = Destination("example.org", 1_000, 5_000, 20_000)
    assert not destination.reachable
    assert destination.next_retry_ms == 25_000


def test_users_of_a_server_are_matched_exactly() -> None:
    users = ["@a:example.org", "@b:sub.example.org", "@c:example.org:8448", "@d:EXAMPLE.ORG"]
    assert _on_server(users, "example.org") == ["@a:example.org"]
    assert _on_server(users, "example.org:8448") == ["@c:example.org:8448"]
    # A server name that is all digits must not match another server's port.
    assert _on_server(["@e:example.org:8448"], "8448") == []


def test_key_ids_by_type() -> None:
    keys = {
        "master": {"user_id": "@a:x", "usage": ["master"], "keys": {"ed25519:AAA": "AAA"}},
        "self_signing": {"keys": {"ed25519:BBB": "BBB"}},
        "user_signing": {"keys": {}},
    }
    assert _key_ids(keys) == {"master": "ed25519:AAA", "self_signing": "ed25519:BBB"}


def test_a_user_known_only_by_a_shared_room_is_known() -> None:
    assert RemoteUser("@a:x", False, True, None, 0, {}).known
    assert not RemoteUser("@a:x", False, False, None, 0, {}).known


@pytest.mark.parametrize(
    "name", ["example.org", "localhost:8448", "1.2.3.4", "[::1]:8448", "a-b.c", "8448"]
)
def test_valid_server_names(name: str) -> None:
    check_server_name(name)


@pytest.mark.parametrize(
    "name", ["", "bad server", "example.org:", "example.org:99999", "ex_ample.org", "[::1", "a/b"]
)
def test_invalid_server_names(name: str) -> None:
    with pytest.raises(InvalidServerName):
        check_server_name(name)
