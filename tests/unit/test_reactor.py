"""Work a request starts beside what it awaits, and work it leaves for after its response:
the seam's `Started` and `run_after_response`, on Twisted's deterministic clock."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet import defer
from twisted.internet.task import Clock

from synapse_xsign_uia._synapse.reactor import Started, run_after_response


async def answer(value: int) -> int:
    return value


async def fail() -> int:
    raise ValueError("the database went away")


def settle(coroutine: Any) -> Any:
    """What a coroutine that awaits nothing still pending returns, or the Failure of what it
    raises (handled here, so that Twisted does not report it)."""
    outcomes: list[Any] = []
    defer.ensureDeferred(coroutine).addBoth(outcomes.append)
    return outcomes[0]


def test_started_work_gives_its_result_once() -> None:
    started = Started(answer, 7)
    assert settle(started.result()) == 7
    again = settle(started.result())
    assert again.check(RuntimeError)


def test_started_work_raises_what_it_raised() -> None:
    started = Started(fail)
    assert settle(started.result()).check(ValueError)


def test_discarded_work_is_waited_for_and_its_failure_dropped() -> None:
    pending: defer.Deferred[int] = defer.Deferred()

    async def slow() -> int:
        return await pending

    started = Started(slow)
    discarding = defer.ensureDeferred(started.discard())
    assert not discarding.called
    pending.errback(ValueError("the database went away"))
    assert discarding.called and discarding.result is None
    # Discarding again, or after the result was awaited, changes nothing.
    assert settle(started.discard()) is None
    awaited = Started(answer, 1)
    assert settle(awaited.result()) == 1
    assert settle(awaited.discard()) is None


class Api:
    def __init__(self) -> None:
        self.started: list[str] = []

    def run_as_background_process(self, desc: str, func: Any, *args: Any) -> None:
        self.started.append(desc)


class Request:
    def __init__(self) -> None:
        self.finished = False
        self._disconnected = False
        self.notifications: list[defer.Deferred[None]] = []

    def notifyFinish(self) -> defer.Deferred[None]:
        self.notifications.append(defer.Deferred())
        return self.notifications[-1]


def test_work_after_the_response_waits_for_the_reactor_after_the_request_finished() -> None:
    api, clock, request = Api(), Clock(), Request()
    module_api = cast(Any, api)
    run_after_response(module_api, clock, request, "record", answer, 1)
    clock.advance(0)
    assert api.started == []
    request.finished = True
    request.notifications[0].callback(None)
    # Not from within `finish`: from the reactor's calls (two rounds of them on a real
    # reactor, which polls, and so writes the response, in between).
    assert api.started == []
    clock.advance(0)
    assert api.started == ["record"]


def test_work_after_the_response_starts_when_the_client_went_away() -> None:
    api, clock, request = Api(), Clock(), Request()
    module_api = cast(Any, api)
    run_after_response(module_api, clock, request, "record", answer, 1)
    request.notifications[0].errback(ConnectionError("lost"))
    clock.advance(0)
    clock.advance(0)
    assert api.started == ["record"]


def test_work_after_a_finished_response_starts_without_waiting_for_it() -> None:
    api, clock, request = Api(), Clock(), Request()
    module_api = cast(Any, api)
    request.finished = True
    run_after_response(module_api, clock, request, "record", answer, 1)
    assert request.notifications == []
    clock.advance(0)
    clock.advance(0)
    assert api.started == ["record"]
