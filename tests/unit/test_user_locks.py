"""The in-process per-user lock that serialises uploads: one holder per user, waiters in
arrival order, other users unaffected, a waiter that gives up leaves the queue, and
Synapse's logging context is the caller's own after every step.

The integration tests show the lock at work in a homeserver (tests/integration/
test_concurrency.py); these pin down its rules one step at a time."""

from __future__ import annotations

from typing import Any, cast

import synapse.logging.context as logcontext
from synapse.logging.context import current_context, run_in_background
from synapse.module_api import make_deferred_yieldable
from twisted.internet import defer
from twisted.python.failure import Failure

from synapse_xsign_uia._synapse.locks import UserLocks


def new_context(name: str) -> Any:
    # A Rust class with a required `server_name` in recent releases.
    context_class: Any = cast(Any, logcontext).LoggingContext
    try:
        return context_class(name=name, server_name="test")
    except TypeError:
        return context_class(name=name)


class Holder:
    """A request, in a logging context of its own, that takes the lock for `key` and keeps
    it until `leave` fires."""

    def __init__(self, locks: UserLocks, key: str, log: list[str], name: str) -> None:
        self.leave: defer.Deferred[None] = defer.Deferred()
        self.name = name
        self.context_inside: bool | None = None
        self._locks, self._key, self._log = locks, key, log
        with new_context(name) as context:
            self.context = context
            self.done: defer.Deferred[None] = run_in_background(self._run)

    async def _run(self) -> None:
        async with self._locks.hold(self._key):
            self.context_inside = current_context() is self.context
            self._log.append(f"{self.name} in")
            await make_deferred_yieldable(self.leave)
            self._log.append(f"{self.name} out")
            self.context_inside = self.context_inside and current_context() is self.context


def note_failure(failure: Failure, log: list[str], what: str) -> None:
    log.append(f"{what}: {type(failure.value).__name__}")


def release(holder: Holder) -> None:
    holder.leave.callback(None)


def test_one_holder_per_user_in_arrival_order() -> None:
    locks = UserLocks()
    log: list[str] = []
    first, second, third = (Holder(locks, "@a:hs", log, name) for name in ("1", "2", "3"))
    assert log == ["1 in"]
    release(first)
    assert log == ["1 in", "1 out", "2 in"]
    release(second)
    release(third)
    assert log == ["1 in", "1 out", "2 in", "2 out", "3 in", "3 out"]
    assert all(holder.done.called for holder in (first, second, third))
    assert locks._waiting == {}


def test_other_users_do_not_wait() -> None:
    locks = UserLocks()
    log: list[str] = []
    alice = Holder(locks, "@alice:hs", log, "alice")
    bob = Holder(locks, "@bob:hs", log, "bob")
    assert log == ["alice in", "bob in"]
    release(bob)
    release(alice)
    assert locks._waiting == {}


def test_a_waiter_that_gives_up_leaves_the_queue() -> None:
    locks = UserLocks()
    log: list[str] = []
    first = Holder(locks, "@a:hs", log, "1")
    second = Holder(locks, "@a:hs", log, "2")
    third = Holder(locks, "@a:hs", log, "3")
    second.done.addErrback(note_failure, log, "2 gave up")
    second.done.cancel()
    assert log == ["1 in", "2 gave up: CancelledError"]
    release(first)
    assert log[-1] == "3 in"
    release(third)
    assert locks._waiting == {}


def test_an_error_inside_releases_the_lock() -> None:
    locks = UserLocks()
    log: list[str] = []
    first = Holder(locks, "@a:hs", log, "1")
    second = Holder(locks, "@a:hs", log, "2")
    first.done.addErrback(note_failure, log, "1 failed")
    first.leave.errback(RuntimeError("boom"))
    assert log == ["1 in", "2 in", "1 failed: RuntimeError"]
    release(second)
    assert locks._waiting == {}


def test_logging_contexts_stay_with_their_holders() -> None:
    locks = UserLocks()
    log: list[str] = []
    outside = current_context()
    holders = [Holder(locks, "@a:hs", log, name) for name in ("1", "2", "3")]
    for holder in holders:
        assert current_context() is outside
        release(holder)
    assert current_context() is outside
    assert [holder.context_inside for holder in holders] == [True, True, True]
