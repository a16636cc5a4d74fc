"""Every query of the module's own tables, and the transactions that combine them with the
replacement-window column of Synapse's master-key rows.

The tables are created at start-up (`create_tables`, idempotent). An operation that comes
before that has finished creates them itself first, so that no request depends on the
order in which the start-up work and the first requests reach the database.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs

from synapse_xsign_uia._synapse import latest_master_keys, set_window_expiry
from synapse_xsign_uia.policy import UiaSessionRecord

if TYPE_CHECKING:
    from synapse_xsign_uia._synapse import Synapse

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Who granted which window: Synapse's column holds only the expiry, and the replacement that
# uses a window may happen on another worker or after a restart.
GRANTS_TABLE = "synapse_xsign_uia_replacement_grants"
# Identity-reset notices queued by workers for the main process, which alone sends them.
NOTICES_TABLE = "synapse_xsign_uia_reset_notices"
# The UIA sessions the upload endpoint offered: to which device, for which keys, and whether
# they have authorised a write (`strict_uia_sessions`).
UIA_SESSIONS_TABLE = "synapse_xsign_uia_uia_sessions"
# Who holds the lock on writing a user's keys, across processes, and until when.
USER_LOCKS_TABLE = "synapse_xsign_uia_user_locks"
# Device-list resyncs across processes: who fetches a remote user's list now (a claim), and
# when a fetch last succeeded (the cooldown) or failed (what the waiting processes answer).
RESYNC_CLAIMS_TABLE = "synapse_xsign_uia_resync_claims"
# When this homeserver last fetched each remote user's list, whoever asked, and the last
# failure: what Synapse does not record.
FETCHES_TABLE = "synapse_xsign_uia_device_list_fetches"
# The last repair of each remote server's device lists, and who asked for it.
REPAIRS_TABLE = "synapse_xsign_uia_device_list_repairs"

_TABLES = {
    GRANTS_TABLE: (
        "user_id TEXT NOT NULL PRIMARY KEY, master_key TEXT NOT NULL,"
        " expires_ms BIGINT NOT NULL, granted_by TEXT NOT NULL, granted_at_ms BIGINT NOT NULL"
    ),
    NOTICES_TABLE: (
        "notice_id TEXT NOT NULL PRIMARY KEY, user_id TEXT NOT NULL, rule TEXT NOT NULL,"
        " content TEXT NOT NULL, queued_at_ms BIGINT NOT NULL, attempts INTEGER NOT NULL"
    ),
    UIA_SESSIONS_TABLE: (
        "session_id TEXT NOT NULL PRIMARY KEY, user_id TEXT NOT NULL, device_id TEXT,"
        " keys_hash TEXT NOT NULL, created_at_ms BIGINT NOT NULL, used_at_ms BIGINT"
    ),
    USER_LOCKS_TABLE: (
        "user_id TEXT NOT NULL PRIMARY KEY, holder TEXT NOT NULL, token TEXT NOT NULL,"
        " expires_ms BIGINT NOT NULL"
    ),
    RESYNC_CLAIMS_TABLE: (
        "user_id TEXT NOT NULL PRIMARY KEY, claim TEXT, claimed_ms BIGINT,"
        " fetched_ms BIGINT, failed_ms BIGINT, failure TEXT"
    ),
    FETCHES_TABLE: (
        "user_id TEXT NOT NULL PRIMARY KEY, fetched_ms BIGINT, failed_ms BIGINT,"
        " failure_reason TEXT, failure_detail TEXT"
    ),
    REPAIRS_TABLE: (
        "server_name TEXT NOT NULL PRIMARY KEY, requested_ms BIGINT NOT NULL,"
        " requested_by TEXT NOT NULL, users_marked INTEGER NOT NULL"
    ),
}
_INDEXES = {
    f"{UIA_SESSIONS_TABLE}_created": f"{UIA_SESSIONS_TABLE} (created_at_ms)",
}
# How many queued notices one drain of the queue reads.
NOTICE_BATCH = 100


@attrs.frozen
class Window:
    """The replacement window of a user's latest master key, as stored."""

    master_key: str  # the unpadded-base64 public key it was opened for
    expires_ms: int | None


@attrs.frozen
class QueuedNotice:
    notice_id: str
    user_id: str
    rule: str
    content: dict[str, Any]
    attempts: int


def _create_tables(cursor: Any) -> None:
    for name, columns in _TABLES.items():
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {name} ({columns})")
    for name, on in _INDEXES.items():
        cursor.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {on}")


def _grant(
    cursor: Any, user_id: str, expires_ms: int, granted_by: str, now_ms: int
) -> Window | None:
    rows = latest_master_keys(cursor, user_id)
    if not rows:
        return None
    set_window_expiry(cursor, user_id, rows[0], expires_ms)
    cursor.execute(f"DELETE FROM {GRANTS_TABLE} WHERE user_id = ?", (user_id,))
    cursor.execute(
        f"INSERT INTO {GRANTS_TABLE} (user_id, master_key, expires_ms, granted_by, granted_at_ms)"
        " VALUES (?, ?, ?, ?, ?)",
        (user_id, rows[0].public_key, expires_ms, granted_by, now_ms),
    )
    return Window(rows[0].public_key, expires_ms)


def _revoke(cursor: Any, user_id: str) -> Window | None:
    rows = latest_master_keys(cursor, user_id)
    if not rows:
        return None
    if rows[0].window_expires_ms is not None:
        set_window_expiry(cursor, user_id, rows[0], None)
    cursor.execute(f"DELETE FROM {GRANTS_TABLE} WHERE user_id = ?", (user_id,))
    return Window(rows[0].public_key, rows[0].window_expires_ms)


def _grantor(cursor: Any, user_id: str, master_replaced: bool) -> str | None:
    cursor.execute(
        f"SELECT master_key, expires_ms, granted_by FROM {GRANTS_TABLE} WHERE user_id = ?",
        (user_id,),
    )
    grant = cursor.fetchone()
    if grant is None:
        return None
    rows = latest_master_keys(cursor, user_id, 2)
    # The window belonged to the previous master key if the upload replaced it.
    used = rows[1] if master_replaced and len(rows) > 1 else rows[0] if rows else None
    if master_replaced:
        # A grant whose key is gone is spent.
        cursor.execute(f"DELETE FROM {GRANTS_TABLE} WHERE user_id = ?", (user_id,))
    master_key, expires_ms, granted_by = grant
    # A later write of the column by anyone else (say, delegated auth) makes the recorded
    # grant stale.
    if used is not None and used.public_key == master_key and used.window_expires_ms == expires_ms:
        return str(granted_by)
    return None


@attrs.frozen
class SessionOffer:
    """A UIA session of the upload endpoint, the device and keys it is for, and when."""

    session_id: str
    user_id: str
    device_id: str | None
    keys_hash: str
    at_ms: int


def _save_uia_session(cursor: Any, offer: SessionOffer, spent_at_ms: int | None) -> None:
    spent = spent_at_ms is not None
    on_conflict = "DO UPDATE SET used_at_ms = excluded.used_at_ms" if spent else "DO NOTHING"
    cursor.execute(
        f"INSERT INTO {UIA_SESSIONS_TABLE}"
        " (session_id, user_id, device_id, keys_hash, created_at_ms, used_at_ms)"
        f" VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (session_id) {on_conflict}",
        (
            offer.session_id,
            offer.user_id,
            offer.device_id,
            offer.keys_hash,
            offer.at_ms,
            spent_at_ms,
        ),
    )


def spend_uia_session_txn(cursor: Any, offer: SessionOffer, now_ms: int) -> None:
    """Inside the transaction of the write a session authorises: mark the session as having
    authorised it, recording it now if it was not (a session created by a request that brought
    its own credentials). A write that fails undoes it: the session used nothing."""
    _save_uia_session(cursor, offer, now_ms)


@attrs.frozen
class LockTaken(Generic[T]):
    """A user's lock, taken, and what was read in the same database interaction."""

    read: T


class LockLost(Exception):
    """The lease on a user's lock ended while this process held it (it stalled for longer
    than the lease, and another process took the lock): what it was writing is not written."""


def end_user_lock_txn(cursor: Any, user_id: str, token: str) -> None:
    """Inside a write's transaction: end the lease `token` holds on the user's lock, with the
    write's commit, or raise `LockLost` if another process holds it now. On PostgreSQL the
    deleted row stays locked until the transaction ends, so the lease cannot change hands
    before the commit, and a rolled-back write leaves the lease as it was."""
    cursor.execute(
        f"DELETE FROM {USER_LOCKS_TABLE} WHERE user_id = ? AND token = ?", (user_id, token)
    )
    if cursor.rowcount != 1:
        raise LockLost(f"the lock on writing {user_id}'s keys was taken over")


@attrs.frozen
class ResyncClaim:
    """A remote user's row of resync claims: whether this process's claim was granted, and
    what the row held."""

    granted: bool
    claim: str | None  # the claim of the process fetching now, if any
    claimed_ms: int | None
    fetched_ms: int | None  # the last successful fetch: the cooldown runs from it
    failed_ms: int | None
    failure: dict[str, Any] | None  # the last failure, as `ResyncFailure` fields


def _resync_claim(row: tuple[Any, ...] | None, granted: bool) -> ResyncClaim:
    if row is None:
        return ResyncClaim(granted, None, None, None, None, None)
    claim, claimed_ms, fetched_ms, failed_ms, failure = row
    return ResyncClaim(
        granted,
        claim,
        claimed_ms,
        fetched_ms,
        failed_ms,
        None if failure is None else json.loads(failure),
    )


_SELECT_CLAIM = (
    f"SELECT claim, claimed_ms, fetched_ms, failed_ms, failure FROM {RESYNC_CLAIMS_TABLE}"
    " WHERE user_id = ?"
)


def _claim_resync(
    cursor: Any, user_id: str, claim: str, now_ms: int, fetched_before_ms: int, lease_ms: int
) -> ResyncClaim:
    # One statement decides: on PostgreSQL a concurrent claim of the same row waits for this
    # one, then fails the transaction, which Synapse retries and which then sees this claim.
    cursor.execute(
        f"INSERT INTO {RESYNC_CLAIMS_TABLE} AS claims (user_id, claim, claimed_ms)"
        " VALUES (?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET"
        " claim = excluded.claim, claimed_ms = excluded.claimed_ms"
        " WHERE (claims.claimed_ms IS NULL OR claims.claimed_ms < ?)"
        " AND (claims.fetched_ms IS NULL OR claims.fetched_ms <= ?)",
        (user_id, claim, now_ms, now_ms - lease_ms, fetched_before_ms),
    )
    granted = cursor.rowcount == 1
    cursor.execute(_SELECT_CLAIM, (user_id,))
    return _resync_claim(cursor.fetchone(), granted)


@attrs.frozen
class FetchRecord:
    """When a remote user's list was last fetched, and the last failure."""

    fetched_ms: int | None
    failed_ms: int | None
    failure_reason: str | None
    failure_detail: str | None


@attrs.frozen
class Repair:
    """The last repair of a remote server's device lists."""

    requested_ms: int
    requested_by: str
    users_marked: int


class Store:
    """The module's persistent state, in Synapse's database."""

    def __init__(self, synapse: Synapse) -> None:
        self._synapse = synapse
        self._tables_ready = False

    async def create_tables(self) -> None:
        if self._tables_ready:
            return
        try:
            await self._synapse.run_db_interaction(
                "synapse_xsign_uia_create_tables", _create_tables
            )
        except Exception:
            # Two creations at once (two processes starting) can collide on PostgreSQL,
            # which checks the catalog before it locks it; the loser finds the tables there
            # on a second try.
            await self._synapse.run_db_interaction(
                "synapse_xsign_uia_create_tables", _create_tables
            )
        self._tables_ready = True

    async def _run(self, desc: str, txn: Any, *args: Any) -> Any:
        await self.create_tables()
        return await self._synapse.run_db_interaction(f"synapse_xsign_uia_{desc}", txn, *args)

    async def _run_statement(self, desc: str, statement: Any, *args: Any) -> Any:
        """`_run` for a function whose statements each stand on their own, without a
        transaction around them."""
        await self.create_tables()
        return await self._synapse.run_db_statement(f"synapse_xsign_uia_{desc}", statement, *args)

    async def _execute(self, desc: str, sql: str, args: tuple[Any, ...]) -> int:
        """Execute one statement; how many rows it changed."""

        def statement(cursor: Any) -> int:
            cursor.execute(sql, args)
            return int(cursor.rowcount)

        changed: int = await self._run_statement(desc, statement)
        return changed

    # The admin replacement window.

    async def read_window(self, user_id: str) -> Window | None:
        """The latest master key's window; None when the user has no master key."""

        def txn(cursor: Any) -> Window | None:
            rows = latest_master_keys(cursor, user_id)
            return Window(rows[0].public_key, rows[0].window_expires_ms) if rows else None

        return await self._synapse.run_db_interaction(  # type: ignore[no-any-return]
            "synapse_xsign_uia_read_window", txn
        )

    async def grant_window(
        self, user_id: str, expires_ms: int, granted_by: str, now_ms: int
    ) -> Window | None:
        """Open a window on the latest master key and record who opened it; None when the
        user has no master key."""
        window: Window | None = await self._run(
            "grant_window", _grant, user_id, expires_ms, granted_by, now_ms
        )
        return window

    async def revoke_window(self, user_id: str) -> Window | None:
        """Close the latest master key's window; returns it as it was before, or None when
        the user has no master key."""
        window: Window | None = await self._run("revoke_window", _revoke, user_id)
        return window

    async def window_grantor(self, user_id: str, *, master_replaced: bool) -> str | None:
        """Who granted the window an upload just went through, or None when no admin did
        through this module (the Matrix Authentication Service's own endpoint, say).
        Called under the upload lock, right after the upload."""
        grantor: str | None = await self._run("window_grantor", _grantor, user_id, master_replaced)
        return grantor

    # Identity-reset notices queued by workers.

    async def queue_notice(
        self, user_id: str, rule: str, content: Mapping[str, Any], now_ms: int
    ) -> None:
        def txn(cursor: Any) -> None:
            cursor.execute(
                f"INSERT INTO {NOTICES_TABLE}"
                " (notice_id, user_id, rule, content, queued_at_ms, attempts)"
                " VALUES (?, ?, ?, ?, ?, 0)",
                (secrets.token_hex(16), user_id, rule, json.dumps(content), now_ms),
            )

        await self._run("queue_notice", txn)

    async def queued_notices(self) -> list[QueuedNotice]:
        """The oldest queued notices, at most `NOTICE_BATCH`."""

        def txn(cursor: Any) -> list[QueuedNotice]:
            cursor.execute(
                f"SELECT notice_id, user_id, rule, content, attempts FROM {NOTICES_TABLE}"
                f" ORDER BY queued_at_ms, notice_id LIMIT {NOTICE_BATCH}"
            )
            return [
                QueuedNotice(str(row[0]), str(row[1]), str(row[2]), json.loads(row[3]), int(row[4]))
                for row in cursor.fetchall()
            ]

        notices: list[QueuedNotice] = await self._run("queued_notices", txn)
        return notices

    async def remove_notice(self, notice_id: str) -> None:
        sql = f"DELETE FROM {NOTICES_TABLE} WHERE notice_id = ?"
        await self._execute("remove_notice", sql, (notice_id,))

    async def count_notice_attempt(self, notice_id: str) -> None:
        sql = f"UPDATE {NOTICES_TABLE} SET attempts = attempts + 1 WHERE notice_id = ?"
        await self._execute("notice_attempt", sql, (notice_id,))

    # UIA sessions offered by the upload endpoint.

    async def record_uia_session(self, offer: SessionOffer) -> None:
        """Record the device and keys a session was offered for; a session already recorded
        keeps what it was first offered for."""
        await self._run_statement("record_uia_session", _save_uia_session, offer, None)

    async def uia_session(self, session_id: str, user_id: str) -> UiaSessionRecord | None:
        def txn(cursor: Any) -> UiaSessionRecord | None:
            cursor.execute(
                f"SELECT device_id, keys_hash, used_at_ms FROM {UIA_SESSIONS_TABLE}"
                " WHERE session_id = ? AND user_id = ?",
                (session_id, user_id),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            return UiaSessionRecord(row[0], str(row[1]), spent=row[2] is not None)

        record: UiaSessionRecord | None = await self._run_statement("uia_session", txn)
        return record

    async def delete_uia_sessions_before(self, before_ms: int) -> int:
        """Delete the records of sessions created before `before_ms`; how many."""
        sql = f"DELETE FROM {UIA_SESSIONS_TABLE} WHERE created_at_ms < ?"
        return await self._execute("expire_uia_sessions", sql, (before_ms,))

    # The lock on writing a user's keys, across processes.

    async def try_lock_user(
        self,
        user_id: str,
        holder: str,
        token: str,
        now_ms: int,
        expires_ms: int,
        then: Callable[[Any], T],
    ) -> LockTaken[T] | None:
        """Take the user's lock for `token` until `expires_ms`, if nobody holds it or the
        lease of whoever did has ended before `now_ms`; and then, in the same database
        interaction, run `then(cursor)` (a read of what the lock guards): one trip through
        Synapse's database threads rather than two. None when the lock was not taken."""
        sql = (
            f"INSERT INTO {USER_LOCKS_TABLE} AS held (user_id, holder, token, expires_ms)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET"
            " holder = excluded.holder, token = excluded.token,"
            " expires_ms = excluded.expires_ms WHERE held.expires_ms < ?"
        )

        def statements(cursor: Any) -> LockTaken[T] | None:
            cursor.execute(sql, (user_id, holder, token, expires_ms, now_ms))
            if cursor.rowcount != 1:
                return None
            return LockTaken(then(cursor))

        taken: LockTaken[T] | None = await self._run_statement("lock_user", statements)
        return taken

    async def renew_user_locks(self, holder: str, expires_ms: int) -> None:
        """Extend the lease of every lock `holder` holds."""
        sql = f"UPDATE {USER_LOCKS_TABLE} SET expires_ms = ? WHERE holder = ?"
        await self._execute("renew_user_locks", sql, (expires_ms, holder))

    async def unlock_user(self, user_id: str, token: str) -> None:
        sql = f"DELETE FROM {USER_LOCKS_TABLE} WHERE user_id = ? AND token = ?"
        await self._execute("unlock_user", sql, (user_id, token))

    # Device-list resyncs across processes.

    async def claim_resync(
        self, user_id: str, claim: str, now_ms: int, cooldown_ms: int, lease_ms: int
    ) -> ResyncClaim:
        """Claim the fetch of the user's list for `claim`, unless another claim younger than
        `lease_ms` holds it or a fetch succeeded within `cooldown_ms`; the row either way."""
        result: ResyncClaim = await self._run(
            "claim_resync",
            _claim_resync,
            user_id,
            claim,
            now_ms,
            now_ms - cooldown_ms,
            lease_ms,
        )
        return result

    async def resync_claim(self, user_id: str) -> ResyncClaim:
        """The user's row, as another process waiting for the fetch reads it."""

        def statement(cursor: Any) -> ResyncClaim:
            cursor.execute(_SELECT_CLAIM, (user_id,))
            return _resync_claim(cursor.fetchone(), False)

        result: ResyncClaim = await self._run_statement("read_resync_claim", statement)
        return result

    async def finish_resync(
        self, user_id: str, claim: str, now_ms: int, failure: Mapping[str, Any] | None
    ) -> None:
        """Release `claim`, recording the fetch's success (the cooldown starts) or failure."""
        if failure is None:
            sql = (
                f"UPDATE {RESYNC_CLAIMS_TABLE} SET claim = NULL, claimed_ms = NULL,"
                " fetched_ms = ? WHERE user_id = ? AND claim = ?"
            )
            args: tuple[Any, ...] = (now_ms, user_id, claim)
        else:
            sql = (
                f"UPDATE {RESYNC_CLAIMS_TABLE} SET claim = NULL, claimed_ms = NULL,"
                " failed_ms = ?, failure = ? WHERE user_id = ? AND claim = ?"
            )
            args = (now_ms, json.dumps(dict(failure)), user_id, claim)
        await self._execute("finish_resync", sql, args)

    async def delete_resync_claims_before(self, before_ms: int) -> int:
        """Forget the users with no fetch in flight, and none since `before_ms`."""
        sql = (
            f"DELETE FROM {RESYNC_CLAIMS_TABLE} WHERE claim IS NULL"
            " AND COALESCE(fetched_ms, 0) < ? AND COALESCE(failed_ms, 0) < ?"
        )
        return await self._execute("expire_resync_claims", sql, (before_ms, before_ms))

    # Device-list fetches and repairs, for the operator.

    async def record_fetch(
        self, user_id: str, now_ms: int, failure_reason: str | None, failure_detail: str | None
    ) -> None:
        if failure_reason is None:
            sql = (
                f"INSERT INTO {FETCHES_TABLE} (user_id, fetched_ms) VALUES (?, ?)"
                " ON CONFLICT (user_id) DO UPDATE SET fetched_ms = excluded.fetched_ms"
            )
            args: tuple[Any, ...] = (user_id, now_ms)
        else:
            sql = (
                f"INSERT INTO {FETCHES_TABLE}"
                " (user_id, failed_ms, failure_reason, failure_detail) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (user_id) DO UPDATE SET failed_ms = excluded.failed_ms,"
                " failure_reason = excluded.failure_reason,"
                " failure_detail = excluded.failure_detail"
            )
            args = (user_id, now_ms, failure_reason, failure_detail)
        await self._execute("record_device_list_fetch", sql, args)

    async def fetch_record(self, user_id: str) -> FetchRecord | None:
        def statement(cursor: Any) -> FetchRecord | None:
            cursor.execute(
                "SELECT fetched_ms, failed_ms, failure_reason, failure_detail"
                f" FROM {FETCHES_TABLE} WHERE user_id = ?",
                (user_id,),
            )
            row = cursor.fetchone()
            return None if row is None else FetchRecord(*row)

        result: FetchRecord | None = await self._run_statement("read_device_list_fetch", statement)
        return result

    async def record_repair(self, server_name: str, repair: Repair) -> None:
        sql = (
            f"INSERT INTO {REPAIRS_TABLE} (server_name, requested_ms, requested_by, users_marked)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (server_name) DO UPDATE SET"
            " requested_ms = excluded.requested_ms, requested_by = excluded.requested_by,"
            " users_marked = excluded.users_marked"
        )
        args = (server_name, repair.requested_ms, repair.requested_by, repair.users_marked)
        await self._execute("record_device_list_repair", sql, args)

    async def last_repair(self, server_name: str) -> Repair | None:
        def statement(cursor: Any) -> Repair | None:
            cursor.execute(
                f"SELECT requested_ms, requested_by, users_marked FROM {REPAIRS_TABLE}"
                " WHERE server_name = ?",
                (server_name,),
            )
            row = cursor.fetchone()
            return None if row is None else Repair(int(row[0]), str(row[1]), int(row[2]))

        result: Repair | None = await self._run_statement("read_device_list_repair", statement)
        return result
