"""The identity-reset notice: a server notice telling a user that their cross-signing master
key was replaced, when, and how the replacement was authorised, so that a reset made by
someone else with access to the account does not go unnoticed.

Synapse sends server notices from the main process only. An upload served by a worker
queues its notice in a table of the module's; the main process sends what is queued.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import attrs
from synapse.module_api.errors import ConfigError

from synapse_xsign_uia import _synapse
from synapse_xsign_uia.config import NoticeConfig
from synapse_xsign_uia.policy import Rule
from synapse_xsign_uia.tables import ModuleTable

if TYPE_CHECKING:
    from synapse.module_api import ModuleApi
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

# What `{method}` says for each rule that replaces a stored master key. Only these rules
# send a notice: a first upload replaces nothing, and with delegated auth Synapse's own
# servlet answers and the reset is approved in the authentication service.
METHODS: Mapping[Rule, str] = {
    Rule.UIA: "after re-authentication with the account's password or single sign-on",
    Rule.REPLACEMENT_WINDOW: (
        "without re-authentication, in a replacement window that a server administrator opened"
    ),
    Rule.APPSERVICE: "by an application service (such as a bridge) acting for your account",
}

_TABLE = "synapse_xsign_uia_reset_notices"
# How often the main process looks for notices queued by workers.
DRAIN_INTERVAL_MS = 5_000
_DRAIN_BATCH = 100
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


def check_server_notices(config: NoticeConfig, hs: HomeServer) -> None:
    """Refuse to start when the notice is enabled but Synapse cannot send server notices.

    Checked on the main process, which sends them; a worker only queues its notices, so its
    own configuration needs no `server_notices`.
    """
    if not config.enabled or not _synapse.is_main_process(hs):
        return
    if _synapse.server_notices_mxid(hs) is None:
        raise ConfigError(
            "synapse_xsign_uia: 'notify_on_reset.enabled' needs Synapse's server notices: "
            "add a `server_notices` section (at least `system_mxid_localpart`) to "
            "homeserver.yaml, or set 'notify_on_reset.enabled' to false",
            path=["notify_on_reset", "enabled"],
        )


@attrs.frozen
class QueuedNotice:
    notice_id: str
    user_id: str
    rule: str
    content: dict[str, Any]
    attempts: int


class NoticeQueue:
    """Notices queued by workers for the main process, in a table of the module's."""

    def __init__(self, api: ModuleApi) -> None:
        self._api = api
        self._table = ModuleTable(
            api,
            _TABLE,
            "notice_id TEXT NOT NULL PRIMARY KEY, user_id TEXT NOT NULL, rule TEXT NOT NULL,"
            " content TEXT NOT NULL, queued_at_ms BIGINT NOT NULL, attempts INTEGER NOT NULL",
        )

    async def put(self, user_id: str, rule: Rule, content: Mapping[str, Any], now_ms: int) -> None:
        await self._table.ensure()

        def txn(cursor: Any) -> None:
            cursor.execute(
                f"INSERT INTO {_TABLE}"
                " (notice_id, user_id, rule, content, queued_at_ms, attempts)"
                " VALUES (?, ?, ?, ?, ?, 0)",
                (secrets.token_hex(16), user_id, rule.value, json.dumps(content), now_ms),
            )

        await self._api.run_db_interaction("synapse_xsign_uia_queue_notice", txn)

    async def oldest(self) -> list[QueuedNotice]:
        await self._table.ensure()

        def txn(cursor: Any) -> list[QueuedNotice]:
            cursor.execute(
                f"SELECT notice_id, user_id, rule, content, attempts FROM {_TABLE}"
                f" ORDER BY queued_at_ms, notice_id LIMIT {_DRAIN_BATCH}"
            )
            return [
                QueuedNotice(str(row[0]), str(row[1]), str(row[2]), json.loads(row[3]), int(row[4]))
                for row in cursor.fetchall()
            ]

        return await self._api.run_db_interaction("synapse_xsign_uia_queued_notices", txn)  # type: ignore[no-any-return]

    async def remove(self, notice_id: str) -> None:
        def txn(cursor: Any) -> None:
            cursor.execute(f"DELETE FROM {_TABLE} WHERE notice_id = ?", (notice_id,))

        await self._api.run_db_interaction("synapse_xsign_uia_remove_notice", txn)

    async def count_attempt(self, notice_id: str) -> None:
        def txn(cursor: Any) -> None:
            cursor.execute(
                f"UPDATE {_TABLE} SET attempts = attempts + 1 WHERE notice_id = ?", (notice_id,)
            )

        await self._api.run_db_interaction("synapse_xsign_uia_notice_attempt", txn)


class ResetNotifier:
    """Sends the notice in the background, so that a slow or failing notice never delays or
    fails the upload that triggered it."""

    def __init__(self, config: NoticeConfig, api: ModuleApi, internals: _synapse.Internals) -> None:
        self._config = config
        self._api = api
        self._internals = internals
        self._on_main = _synapse.is_main_process(internals.hs)
        self._queue = NoticeQueue(api)
        self._draining = False
        # Without workers nothing is ever queued.
        if config.enabled and self._on_main and internals.with_workers:
            api.looping_background_call(
                self.send_queued,
                DRAIN_INTERVAL_MS,
                desc="synapse_xsign_uia_send_queued_notices",
                run_on_all_instances=True,
            )

    def master_replaced(self, user_id: str, rule: Rule) -> None:
        """Called right after an upload replaced the user's stored master key."""
        if not self._config.enabled or rule not in METHODS:
            return
        try:
            content = notice_content(
                self._config.message,
                user_id=user_id,
                server_name=self._api.server_name,
                rule=rule,
                now_ms=self._internals.now_ms(),
            )
            _synapse.run_as_background_process(
                self._api, "synapse_xsign_uia_reset_notice", self._deliver, user_id, rule, content
            )
        except Exception:
            # The keys are already stored: the upload has succeeded whatever happens here.
            logger.warning("Could not send the identity-reset notice to %s", user_id, exc_info=True)

    async def _deliver(self, user_id: str, rule: Rule, content: dict[str, Any]) -> None:
        try:
            if self._on_main:
                await _synapse.send_server_notice(self._internals.hs, user_id, content)
                logger.info("Identity-reset notice sent: user=%s rule=%s", user_id, rule.value)
            else:
                await self._queue.put(user_id, rule, content, self._internals.now_ms())
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
            for notice in await self._queue.oldest():
                await self._send_queued_notice(notice)
        except Exception:
            logger.warning("Could not send the queued identity-reset notices", exc_info=True)
        finally:
            self._draining = False

    async def _send_queued_notice(self, notice: QueuedNotice) -> None:
        try:
            await _synapse.send_server_notice(self._internals.hs, notice.user_id, notice.content)
        except Exception:
            attempts = notice.attempts + 1
            if attempts >= MAX_ATTEMPTS:
                logger.warning(
                    "Could not send the identity-reset notice to %s (rule=%s); giving up "
                    "after %d attempts",
                    notice.user_id,
                    notice.rule,
                    attempts,
                    exc_info=True,
                )
                await self._queue.remove(notice.notice_id)
            else:
                logger.warning(
                    "Could not send the identity-reset notice to %s (rule=%s); will retry",
                    notice.user_id,
                    notice.rule,
                    exc_info=True,
                )
                await self._queue.count_attempt(notice.notice_id)
            return
        # Removed only once sent: if this process stops in between, the notice is sent
        # again after the restart rather than lost.
        await self._queue.remove(notice.notice_id)
        logger.info("Identity-reset notice sent: user=%s rule=%s", notice.user_id, notice.rule)
