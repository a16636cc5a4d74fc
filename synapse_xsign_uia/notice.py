"""The identity-reset notice: a message telling a user that their cross-signing master key
was replaced, when, how the replacement was authorised, and from which device and IP
address, so that a reset made by someone else with access to the account does not go
unnoticed. As a server notice (`notify_on_reset.enabled`), by email (`notify_on_reset.email`,
see `reset_email.py`), or both.

Synapse sends server notices from the main process only. An upload served by a worker
queues its notice in a table of the module's; the main process sends what is queued.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import attrs
from synapse.module_api.errors import ConfigError

from synapse_xsign_uia.config import NoticeConfig
from synapse_xsign_uia.policy import Rule
from synapse_xsign_uia.reset_email import send_reset_email
from synapse_xsign_uia.store import QueuedNotice, Store

if TYPE_CHECKING:
    from synapse_xsign_uia._synapse import Caller, Synapse

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


@attrs.frozen
class Reset:
    """A replacement of a user's master key, as the notice tells it."""

    user_id: str
    rule: Rule
    time_ms: int
    device_id: str | None  # of the access token that asked; None for an application service
    device_name: str | None
    ip_address: str

    @property
    def device(self) -> str:
        if self.device_id is None:
            return "none (an application service's own access token)"
        if self.device_name:
            return f"{self.device_id} ({self.device_name})"
        return self.device_id


def notice_text(template: str, reset: Reset, server_name: str) -> str:
    """The notice's text. `template` was checked at start-up, so only the known
    placeholders occur in it."""
    return template.format(
        time=format_time(reset.time_ms),
        user_id=reset.user_id,
        server_name=server_name,
        method=METHODS[reset.rule],
        device=reset.device,
        ip_address=reset.ip_address,
    )


def check_notice_config(config: NoticeConfig, synapse: Synapse) -> None:
    """Refuse to start when the notice is on but Synapse cannot send it.

    Server notices are sent by the main process; a worker only queues its notices, so its
    own configuration needs no `server_notices`. Every process sends its own emails.
    """
    if config.email and not synapse.can_send_email:
        raise ConfigError(
            "synapse_xsign_uia: 'notify_on_reset.email' needs Synapse to send email: add an "
            "`email` section with `notif_from` and the SMTP settings (`smtp_host`, "
            "`smtp_port`, ...) to homeserver.yaml, or set 'notify_on_reset.email' to false",
            path=["notify_on_reset", "email"],
        )
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

    def master_replaced(self, caller: Caller, rule: Rule) -> None:
        """Called right after an upload by `caller` replaced their stored master key."""
        if not (self._config.enabled or self._config.email) or rule not in METHODS:
            return
        try:
            self._synapse.run_in_background(
                "synapse_xsign_uia_reset_notice",
                self._tell,
                caller.user_id,
                rule,
                caller.device_id,
                caller.ip_address,
                self._synapse.now_ms(),
            )
        except Exception:
            # The keys are already stored: the upload has succeeded whatever happens here.
            logger.warning(
                "Could not send the identity-reset notice to %s", caller.user_id, exc_info=True
            )

    async def _tell(
        self, user_id: str, rule: Rule, device_id: str | None, ip_address: str, now_ms: int
    ) -> None:
        try:
            device_name = None
            if device_id is not None:
                device_name = await self._synapse.device_display_name(user_id, device_id)
            reset = Reset(user_id, rule, now_ms, device_id, device_name, ip_address)
            text = notice_text(self._config.message, reset, self._synapse.server_name)
        except Exception:
            logger.warning(
                "Could not write the identity-reset notice to %s (rule=%s)",
                user_id,
                rule.value,
                exc_info=True,
            )
            return
        if self._config.enabled:
            await self._deliver(user_id, rule, {"msgtype": "m.text", "body": text})
        if self._config.email:
            sent = await send_reset_email(self._synapse, user_id, text)
            logger.info(
                "Identity-reset email sent: user=%s rule=%s addresses=%d", user_id, rule.value, sent
            )

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
