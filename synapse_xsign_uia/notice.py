"""The identity-reset notice: a server notice telling a user that their cross-signing master
key was replaced, when, and how the replacement was authorised, so that a reset made by
someone else with access to the account does not go unnoticed.

Synapse sends server notices from the main process only. An upload served by a worker
queues its notice in a table of the module's; the main process sends what is queued.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from synapse.module_api.errors import ConfigError

from synapse_xsign_uia.config import NoticeConfig
from synapse_xsign_uia.policy import Rule
from synapse_xsign_uia.store import QueuedNotice, Store

if TYPE_CHECKING:
    from synapse_xsign_uia._synapse import Synapse

logger = logging.getLogger(__name__)

# What `{method}` says for each rule that can replace a stored master key: a first upload
# replaces nothing, and with delegated auth the reset is approved in the authentication
# service.
METHODS: Mapping[Rule, str] = {
    Rule.UIA: "after re-authentication with the account's password or single sign-on",
    Rule.REPLACEMENT_WINDOW: (
        "without re-authentication, in a replacement window that a server administrator opened"
    ),
    Rule.APPSERVICE: "by an application service (such as a bridge) acting for your account",
}

# How often the main process looks for notices queued by workers.
DRAIN_INTERVAL_MS = 5_000
# A queued notice that fails this many times is dropped, with a warning each time.
MAX_ATTEMPTS = 5


def format_time(ms: int) -> str:
    """UTC ISO-8601 to the second: `2024-05-01T12:34:56Z`."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def notice_content(
    template: str, *, user_id: str, server_name: str, rule: Rule, now_ms: int
) -> dict[str, Any]:
    """The event content of the notice. `template` was checked at start-up, so only the
    known placeholders occur in it."""
    body = template.format(
        time=format_time(now_ms),
        user_id=user_id,
        server_name=server_name,
        method=METHODS[rule],
    )
    return {"msgtype": "m.text", "body": body}


def check_server_notices(config: NoticeConfig, synapse: Synapse) -> None:
    """Refuse to start when the notice is enabled but Synapse cannot send server notices.

    Checked on the main process, which sends them; a worker only queues its notices, so its
    own configuration needs no `server_notices`.
    """
    if not config.enabled or not synapse.is_main_process:
        return
    if synapse.notices.sender() is None:
        raise ConfigError(
            "synapse_xsign_uia: 'notify_on_reset.enabled' needs Synapse's server notices: "
            "add a `server_notices` section (at least `system_mxid_localpart`) to "
            "homeserver.yaml, or set 'notify_on_reset.enabled' to false",
            path=["notify_on_reset", "enabled"],
        )


class ResetNotifier:
    """Sends the notice in the background, so that a slow or failing notice never delays or
    fails the upload that triggered it. On a worker it queues the notice for the main
    process."""

    def __init__(self, config: NoticeConfig, synapse: Synapse, store: Store) -> None:
        self._config = config
        self._synapse = synapse
        self._store = store
        self._draining = False
        # Without workers nothing is ever queued.
        if config.enabled and synapse.is_main_process and synapse.with_workers:
            synapse.run_periodically(
                "synapse_xsign_uia_send_queued_notices", self.send_queued, DRAIN_INTERVAL_MS
            )

    def master_replaced(self, user_id: str, rule: Rule) -> None:
        """Called right after an upload replaced the user's stored master key."""
        if not self._config.enabled or rule not in METHODS:
            return
        try:
            content = notice_content(
                self._config.message,
                user_id=user_id,
                server_name=self._synapse.server_name,
                rule=rule,
                now_ms=self._synapse.now_ms(),
            )
            self._synapse.run_in_background(
                "synapse_xsign_uia_reset_notice", self._deliver, user_id, rule, content
            )
        except Exception:
            # The keys are already stored: the upload has succeeded whatever happens here.
            logger.warning("Could not send the identity-reset notice to %s", user_id, exc_info=True)

    async def _deliver(self, user_id: str, rule: Rule, content: dict[str, Any]) -> None:
        try:
            if self._synapse.is_main_process:
                await self._synapse.notices.send(user_id, content)
                logger.info("Identity-reset notice sent: user=%s rule=%s", user_id, rule.value)
            else:
                await self._store.queue_notice(user_id, rule.value, content, self._synapse.now_ms())
                logger.info(
                    "Identity-reset notice queued for the main process: user=%s rule=%s",
                    user_id,
                    rule.value,
                )
        except Exception:
            logger.warning(
                "Could not send the identity-reset notice to %s (rule=%s)",
                user_id,
                rule.value,
                exc_info=True,
            )

    async def send_queued(self) -> None:
        """On the main process: send the notices that workers queued, oldest first."""
        if self._draining:
            return
        self._draining = True
        try:
            for notice in await self._store.queued_notices():
                await self._send_queued_notice(notice)
        except Exception:
            logger.warning("Could not send the queued identity-reset notices", exc_info=True)
        finally:
            self._draining = False

    async def _send_queued_notice(self, notice: QueuedNotice) -> None:
        try:
            await self._synapse.notices.send(notice.user_id, notice.content)
        except Exception:
            await self._failed(notice)
            return
        # Removed only once sent: if this process stops in between, the notice is sent
        # again after the restart rather than lost.
        await self._store.remove_notice(notice.notice_id)
        logger.info("Identity-reset notice sent: user=%s rule=%s", notice.user_id, notice.rule)

    async def _failed(self, notice: QueuedNotice) -> None:
        attempts = notice.attempts + 1
        giving_up = attempts >= MAX_ATTEMPTS
        logger.warning(
            "Could not send the identity-reset notice to %s (rule=%s); %s",
            notice.user_id,
            notice.rule,
            f"giving up after {attempts} attempts" if giving_up else "will retry",
            exc_info=True,
        )
        if giving_up:
            await self._store.remove_notice(notice.notice_id)
        else:
            await self._store.count_notice_attempt(notice.notice_id)
