"""Time and background work: Synapse's clock, its reactor and its background runner."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from synapse.module_api import make_deferred_yieldable
from synapse.module_api import run_in_background as _start_in_logcontext
from twisted.internet import defer

if TYPE_CHECKING:
    from synapse.module_api import ModuleApi

logger = logging.getLogger(__name__)


def run_in_background(
    api: ModuleApi, desc: str, func: Callable[..., Awaitable[object]], *args: Any
) -> None:
    """Run `func` in its own logcontext, not awaited. A `ModuleApi` method in newer
    releases; before, only the module-level function (deprecated since)."""
    method = getattr(api, "run_as_background_process", None)
    if method is not None:
        method(desc, func, *args)
        return
    from synapse.module_api import run_as_background_process as run

    run(desc, func, *args)


T = TypeVar("T")


def run_after_response(
    api: ModuleApi,
    reactor: Any,
    request: Any,
    desc: str,
    func: Callable[..., Awaitable[object]],
    *args: Any,
) -> None:
    """Run `func` in its own logcontext, not awaited, once the response to `request` is on
    its way: a reactor turn after the request finished (or its client went away), when the
    reactor has handed the response to the connection.

    Synapse encodes a JSON response on a thread and writes it from the reactor: work started
    before then (a database transaction, whose Python runs on another thread) competes with
    both for the interpreter, and the client waits for it."""

    def start(_: object) -> None:
        # `finish` only queues the response, which the reactor writes at its next poll. A
        # call scheduled now may still run before that poll (the reactor runs the calls due
        # right after the results from threads, the encoded response among them); one
        # scheduled from within a due call waits for the round after the poll.
        reactor.callLater(0, reactor.callLater, 0, run_in_background, api, desc, func, *args)

    if request.finished or request._disconnected:
        start(None)
        return
    # Fires on finish, and fails if the connection is lost first: either way, start.
    request.notifyFinish().addBoth(start)


class Started(Generic[T]):
    """Work of a request started now, to run beside what the request awaits next: its
    result is then either awaited or discarded."""

    def __init__(self, func: Callable[..., Awaitable[T]], *args: Any) -> None:
        # In the request's logcontext, as Synapse runs concurrent work of a request: its
        # database time counts for the request.
        self._deferred: defer.Deferred[T] = _start_in_logcontext(func, *args)
        self._settled = False

    async def result(self) -> T:
        """What the work returns or raises; once."""
        if self._settled:
            raise RuntimeError("the result of started work is awaited once")
        self._settled = True
        return await make_deferred_yieldable(self._deferred)  # type: ignore[no-any-return]

    async def discard(self) -> None:
        """Wait for the work to end and drop its outcome. It runs in the request's
        logcontext, which must not finish before it does. Does nothing once the result was
        awaited."""
        if self._settled:
            return
        self._settled = True
        try:
            await make_deferred_yieldable(self._deferred)
        except Exception:
            # Whatever it raised answers a question the request no longer asks.
            logger.debug("Dropped the outcome of work started for a request", exc_info=True)


async def sleep(reactor: Any, seconds: float) -> None:
    """Wait `seconds` on the reactor, in the caller's logcontext. Synapse's own
    `Clock.sleep` changed its signature between the supported releases."""
    waited: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, waited.callback, None)
    await make_deferred_yieldable(waited)
