"""Fetching a remote user's device list through Synapse's device-list updater: one fetch per
user at a time, a cooldown after a success, and a bounded wait."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

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

logger = logging.getLogger(__name__)


@attrs.frozen
class Outcome:
    """What a wait for a fetch came to: FETCHED, COOLDOWN, FAILED (with the failure) or
    TIMED_OUT."""

    kind: ResyncOutcome
    failure: ResyncFailure | None = None


class ResyncService:
    """Fetches device lists through Synapse's updater, one flight per user, with the
    cooldown; waits for a fetch at most `timeout_ms`."""

    def __init__(self, config: ResyncConfig, synapse: Synapse) -> None:
        self._config = config
        self._synapse = synapse
        self._device_lists = synapse.device_lists()
        self._cooldown: Cooldown[str] = Cooldown(config.per_user_cooldown_ms)
        self._flights: SingleFlight[str, defer.Deferred[Outcome]] = SingleFlight()
        self._metrics = metrics.for_server(synapse.server_name)

    async def resync(self, user_id: str) -> Outcome:
        if self._cooldown.remaining_ms(user_id, self._synapse.now_ms()) > 0:
            return Outcome(ResyncOutcome.COOLDOWN)
        waiter: defer.Deferred[Outcome] = defer.Deferred()
        if self._flights.join(user_id, waiter):
            self._metrics.resync_federation_request()
            self._synapse.run_in_background(
                "synapse_xsign_uia_device_list_resync", self._fetch, user_id
            )
        timer = self._synapse.call_later(
            self._config.timeout_ms / 1000, self._give_up, user_id, waiter
        )
        try:
            return await make_deferred_yieldable(waiter)
        finally:
            if timer.active():
                timer.cancel()

    async def _fetch(self, user_id: str) -> None:
        try:
            failure = await self._device_lists.resync(user_id)
        except Exception:
            logger.exception("Fetching the device list of %s failed", user_id)
            failure = ResyncFailure(FailureReason.ERROR, INTERNAL_ERROR)
        if failure is None:
            self._cooldown.start(user_id, self._synapse.now_ms())
            outcome = Outcome(ResyncOutcome.FETCHED)
            logger.info("Fetched the device list of %s", user_id)
        else:
            outcome = Outcome(ResyncOutcome.FAILED, failure)
            logger.info(
                "Could not fetch the device list of %s (%s: %s); it stays marked stale",
                user_id,
                failure.reason.value,
                failure.detail,
            )
        waiters = self._flights.finish(user_id)
        if waiters:
            # Fired from the reactor, in no logcontext, as Synapse expects of a Deferred
            # that its waiters await through `make_deferred_yieldable`.
            self._synapse.call_later(0, self._wake, waiters, outcome)

    def _give_up(self, user_id: str, waiter: defer.Deferred[Outcome]) -> None:
        self._flights.leave(user_id, waiter)
        if not waiter.called:
            waiter.callback(Outcome(ResyncOutcome.TIMED_OUT))

    @staticmethod
    def _wake(waiters: list[defer.Deferred[Outcome]], outcome: Outcome) -> None:
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(outcome)
