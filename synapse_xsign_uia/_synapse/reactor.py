"""Time and background work: Synapse's clock, its reactor and its background runner."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from synapse.module_api import make_deferred_yieldable
from twisted.internet import defer

if TYPE_CHECKING:
    from synapse.module_api import ModuleApi


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


async def sleep(reactor: Any, seconds: float) -> None:
    """Wait `seconds` on the reactor, in the caller's logcontext. Synapse's own
    `Clock.sleep` changed its signature between the supported releases."""
    waited: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, waited.callback, None)
    await make_deferred_yieldable(waited)
