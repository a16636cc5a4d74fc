"""The admin replacement window, kept in Synapse's own `updatable_without_uia_before_ms`
column, and who granted it."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import attrs

from synapse_xsign_uia.tables import ModuleTable

if TYPE_CHECKING:
    from synapse.module_api import ModuleApi

logger = logging.getLogger(__name__)


# Who granted which window: Synapse's column holds only the expiry, and the replacement that
# uses a window may happen on another worker or after a restart.
_GRANTS_TABLE = "synapse_xsign_uia_replacement_grants"


@attrs.frozen
class Window:
    """The replacement window of a user's latest master key, as stored."""

    master_key: str  # the unpadded-base64 public key it was opened for
    expires_ms: int | None


def _master_public_key(keydata: str) -> str:
    return str(next(iter(json.loads(keydata)["keys"].values())))


def _latest_master(cursor: Any, user_id: str, count: int = 1) -> list[tuple[int, str, int | None]]:
    cursor.execute(
        "SELECT stream_id, keydata, updatable_without_uia_before_ms FROM e2e_cross_signing_keys"
        " WHERE user_id = ? AND keytype = 'master' ORDER BY stream_id DESC LIMIT ?",
        (user_id, count),
    )
    return [(int(row[0]), str(row[1]), row[2]) for row in cursor.fetchall()]


def _set_expiry(cursor: Any, user_id: str, stream_id: int, expires_ms: int | None) -> None:
    cursor.execute(
        "UPDATE e2e_cross_signing_keys SET updatable_without_uia_before_ms = ?"
        " WHERE user_id = ? AND keytype = 'master' AND stream_id = ?",
        (expires_ms, user_id, stream_id),
    )


class ReplacementWindows:
    """Grant, read and revoke the window in Synapse's own `updatable_without_uia_before_ms`
    column, which every worker's upload decision reads, and record who granted it."""

    def __init__(self, api: ModuleApi, clock: Any) -> None:
        self._api = api
        self._clock = clock
        self._grants = ModuleTable(
            api,
            _GRANTS_TABLE,
            "user_id TEXT NOT NULL PRIMARY KEY, master_key TEXT NOT NULL,"
            " expires_ms BIGINT NOT NULL, granted_by TEXT NOT NULL,"
            " granted_at_ms BIGINT NOT NULL",
        )

    async def read(self, user_id: str) -> Window | None:
        """The latest master key's window; None when the user has no master key."""

        def txn(cursor: Any) -> Window | None:
            rows = _latest_master(cursor, user_id)
            if not rows:
                return None
            _, keydata, expires_ms = rows[0]
            return Window(_master_public_key(keydata), expires_ms)

        return await self._api.run_db_interaction("synapse_xsign_uia_read_window", txn)  # type: ignore[no-any-return]

    async def grant(self, user_id: str, duration_ms: int, granted_by: str) -> Window | None:
        """Open a window on the latest master key; None when the user has none."""
        await self._grants.ensure()
        now_ms = int(self._clock.time_msec())
        expires_ms = now_ms + duration_ms

        def txn(cursor: Any) -> Window | None:
            rows = _latest_master(cursor, user_id)
            if not rows:
                return None
            stream_id, keydata, _ = rows[0]
            master_key = _master_public_key(keydata)
            _set_expiry(cursor, user_id, stream_id, expires_ms)
            cursor.execute(f"DELETE FROM {_GRANTS_TABLE} WHERE user_id = ?", (user_id,))
            cursor.execute(
                f"INSERT INTO {_GRANTS_TABLE}"
                " (user_id, master_key, expires_ms, granted_by, granted_at_ms)"
                " VALUES (?, ?, ?, ?, ?)",
                (user_id, master_key, expires_ms, granted_by, now_ms),
            )
            return Window(master_key, expires_ms)

        return await self._api.run_db_interaction("synapse_xsign_uia_grant_window", txn)  # type: ignore[no-any-return]

    async def revoke(self, user_id: str) -> Window | None:
        """Close the latest master key's window; returns it as it was before, or None when
        the user has no master key."""
        await self._grants.ensure()

        def txn(cursor: Any) -> Window | None:
            rows = _latest_master(cursor, user_id)
            if not rows:
                return None
            stream_id, keydata, expires_ms = rows[0]
            if expires_ms is not None:
                _set_expiry(cursor, user_id, stream_id, None)
            cursor.execute(f"DELETE FROM {_GRANTS_TABLE} WHERE user_id = ?", (user_id,))
            return Window(_master_public_key(keydata), expires_ms)

        return await self._api.run_db_interaction("synapse_xsign_uia_revoke_window", txn)  # type: ignore[no-any-return]

    async def grantor(self, user_id: str, *, master_replaced: bool) -> str | None:
        """Who granted the window an upload just went through, or None when no admin did
        through this module (e.g. the Matrix Authentication Service's own endpoint).

        Called under the upload lock, right after the upload: the window belonged to the
        previous master key if the upload replaced it, else to the current one. A grant
        whose key is gone is spent, so it is removed.
        """

        def txn(cursor: Any) -> str | None:
            cursor.execute(
                f"SELECT master_key, expires_ms, granted_by FROM {_GRANTS_TABLE} WHERE user_id = ?",
                (user_id,),
            )
            grant = cursor.fetchone()
            if grant is None:
                return None
            rows = _latest_master(cursor, user_id, 2)
            used = rows[1] if master_replaced and len(rows) > 1 else rows[0] if rows else None
            if master_replaced:
                cursor.execute(f"DELETE FROM {_GRANTS_TABLE} WHERE user_id = ?", (user_id,))
            if used is None:
                return None
            master_key, expires_ms, granted_by = grant
            # A later write of the column by anyone else (say, delegated auth) makes the
            # recorded grant stale.
            if _master_public_key(used[1]) == master_key and used[2] == expires_ms:
                return str(granted_by)
            return None

        try:
            await self._grants.ensure()
            return await self._api.run_db_interaction("synapse_xsign_uia_window_grantor", txn)  # type: ignore[no-any-return]
        except Exception:
            # The keys are already stored: a failed look-up must not fail the request.
            logger.warning("Could not look up who granted %s's window", user_id, exc_info=True)
            return None
