"""Fetching a remote user's device list through Synapse's device-list updater: one fetch per
user at a time and a cooldown after a success, across every process of the homeserver, and
a bounded wait.

Within a process, requests for the same user share one flight. Across processes, the flight
claims the user's row in the database: the process whose claim is granted fetches; the others
read the row until that fetch ends and answer with its outcome. A fetch that succeeded less
than the cooldown ago is found in the same row, and remembered by each process that read it.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Any

import attrs
from synapse.module_api import make_deferred_yieldable
from twisted.internet import defer

from synapse_xsign_uia import metrics
from synapse_xsign_uia._synapse import INTERNAL_ERROR, FailureReason, ResyncFailure
from synapse_xsign_uia.outcomes import ResyncOutcome
from synapse_xsign_uia.resync.flights import SingleFlight
from synapse_xsign_uia.resync.limits import Cooldown

if TYPE_CHECKING:
    from synapse_xsign_uia._synapse import Synapse
    from synapse_xsign_uia.config import ResyncConfig
    from synapse_xsign_uia.store import ResyncClaim, Store

logger = logging.getLogger(__name__)

# A claim this old belongs to a process that died while fetching: Synapse's federation
# requests give up long before.
CLAIM_LEASE_MS = 120_000
# How often a process waiting for another's fetch reads the row: soon, then every second.
_FIRST_POLL_S = 0.05
_LONGEST_POLL_S = 1.0
_CLEANUP_EVERY_MS = 3_600_000


@attrs.frozen
class Outcome:
    """What a wait for a fetch came to: FETCHED, COOLDOWN, FAILED (with the failure) or
    TIMED_OUT."""

    kind: ResyncOutcome
    failure: ResyncFailure | None = None


def failure_fields(failure: ResyncFailure) -> dict[str, Any]:
    """A failure as stored for the processes that wait for the fetch."""
    return {
        "reason": failure.reason.value,
        "detail": failure.detail,
        "retry_at_ms": failure.retry_at_ms,
        "remote_status": failure.remote_status,
    }


def stored_failure(fields: dict[str, Any]) -> ResyncFailure:
    try:
        return ResyncFailure(
            FailureReason(fields["reason"]),
            str(fields["detail"]),
            fields.get("retry_at_ms"),
            fields.get("remote_status"),
        )
    except (KeyError, ValueError):
        return ResyncFailure(FailureReason.ERROR, INTERNAL_ERROR)


class ResyncService:
    """Fetches device lists through Synapse's updater, one flight per user across the
    homeserver, with the cooldown; waits for a fetch at most `timeout_ms`."""

    def __init__(self, config: ResyncConfig, synapse: Synapse, store: Store) -> None:
        self._config = config
        self._synapse = synapse
        self._store = store
        self._device_lists = synapse.device_lists()
        # What this process knows of the homeserver-wide cooldown: the fetches it saw end.
        self._cooldown: Cooldown[str] = Cooldown(config.per_user_cooldown_ms)
        self._flights: SingleFlight[str, defer.Deferred[Outcome]] = SingleFlight()
        self._metrics = metrics.for_server(synapse.server_name)
        if synapse.is_main_process:
            synapse.run_periodically(
                "synapse_xsign_uia_expire_resync_claims", self._forget_old, _CLEANUP_EVERY_MS
            )

    async def resync(self, user_id: str) -> Outcome:
        if self._cooldown.remaining_ms(user_id, self._synapse.now_ms()) > 0:
            return Outcome(ResyncOutcome.COOLDOWN)
        waiter: defer.Deferred[Outcome] = defer.Deferred()
        if self._flights.join(user_id, waiter):
            self._synapse.run_in_background(
                "synapse_xsign_uia_device_list_resync", self._fly, user_id
            )
        timer = self._synapse.call_later(
            self._config.timeout_ms / 1000, self._give_up, user_id, waiter
        )
        try:
            return await make_deferred_yieldable(waiter)
        finally:
            if timer.active():
                timer.cancel()

    async def _fly(self, user_id: str) -> None:
        try:
            outcome = await self._claim_or_wait(user_id)
        except Exception:
            logger.exception("Resyncing the device list of %s failed", user_id)
            outcome = Outcome(
                ResyncOutcome.FAILED, ResyncFailure(FailureReason.ERROR, INTERNAL_ERROR)
            )
        waiters = self._flights.finish(user_id)
        if waiters:
            # Fired from the reactor, in no logcontext, as Synapse expects of a Deferred
            # that its waiters await through `make_deferred_yieldable`.
            self._synapse.call_later(0, self._wake, waiters, outcome)

    async def _claim_or_wait(self, user_id: str) -> Outcome:
        """Fetch if this process's claim is granted; else answer from the cooldown, or with
        the outcome of the fetch another process is making."""
        claim = f"{self._synapse.instance_name}:{secrets.token_hex(8)}"
        while True:
            now_ms = self._synapse.now_ms()
            row = await self._store.claim_resync(
                user_id, claim, now_ms, self._config.per_user_cooldown_ms, CLAIM_LEASE_MS
            )
            if row.granted:
                return await self._fetch(user_id, claim)
            if row.fetched_ms is not None and self._in_cooldown(row.fetched_ms, now_ms):
                self._cooldown.start(user_id, row.fetched_ms)
                return Outcome(ResyncOutcome.COOLDOWN)
            outcome = await self._wait_for_other(user_id, row)
            if outcome is not None:
                return outcome
            # The other process's claim ran out, or its outcome was overwritten: claim again.

    def _in_cooldown(self, fetched_ms: int, now_ms: int) -> bool:
        return now_ms - fetched_ms < self._config.per_user_cooldown_ms

    async def _wait_for_other(self, user_id: str, row: ResyncClaim) -> Outcome | None:
        """The outcome of the fetch that `row`'s claim stands for, once it ends; None if the
        claim runs out first."""
        claimed_ms = row.claimed_ms if row.claimed_ms is not None else self._synapse.now_ms()
        delay_s = _FIRST_POLL_S
        while True:
            await self._synapse.sleep(delay_s)
            delay_s = min(delay_s * 2, _LONGEST_POLL_S)
            current = await self._store.resync_claim(user_id)
            if current.claim is not None and current.claim == row.claim:
                if self._synapse.now_ms() - claimed_ms >= CLAIM_LEASE_MS:
                    return None
                continue
            if current.fetched_ms is not None and current.fetched_ms >= claimed_ms:
                self._cooldown.start(user_id, current.fetched_ms)
                return Outcome(ResyncOutcome.FETCHED)
            if current.failed_ms is not None and current.failed_ms >= claimed_ms:
                return Outcome(ResyncOutcome.FAILED, stored_failure(current.failure or {}))
            return None

    async def _fetch(self, user_id: str, claim: str) -> Outcome:
        self._metrics.resync_federation_request()
        try:
            failure = await self._device_lists.resync(user_id)
        except Exception:
            logger.exception("Fetching the device list of %s failed", user_id)
            failure = ResyncFailure(FailureReason.ERROR, INTERNAL_ERROR)
        now_ms = self._synapse.now_ms()
        try:
            await self._store.finish_resync(
                user_id, claim, now_ms, None if failure is None else failure_fields(failure)
            )
        except Exception:
            # The claim then runs out on its own; the fetch itself is done.
            logger.exception("Recording the resync of %s failed", user_id)
        if failure is None:
            self._cooldown.start(user_id, now_ms)
            logger.info("Fetched the device list of %s", user_id)
            return Outcome(ResyncOutcome.FETCHED)
        logger.info(
            "Could not fetch the device list of %s (%s: %s); it stays marked stale",
            user_id,
            failure.reason.value,
            failure.detail,
        )
        return Outcome(ResyncOutcome.FAILED, failure)

    async def _forget_old(self) -> None:
        before_ms = self._synapse.now_ms() - max(self._config.per_user_cooldown_ms, CLAIM_LEASE_MS)
        await self._store.delete_resync_claims_before(before_ms)

    def _give_up(self, user_id: str, waiter: defer.Deferred[Outcome]) -> None:
        self._flights.leave(user_id, waiter)
        if not waiter.called:
            waiter.callback(Outcome(ResyncOutcome.TIMED_OUT))

    @staticmethod
    def _wake(waiters: list[defer.Deferred[Outcome]], outcome: Outcome) -> None:
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(outcome)
