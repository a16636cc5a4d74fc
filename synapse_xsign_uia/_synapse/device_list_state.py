"""What Synapse's own tables say about remote users' device lists and remote servers, read
for the operator: which users it tracks, which lists it holds as stale and since when, and
its backoff from a server.

Synapse's store has methods for most of these; the timestamps and the per-server views have
none, so they are read with SQL, each view in one transaction.
"""

from __future__ import annotations

from typing import Any

import attrs

# Synapse's tables (the misspelling is Synapse's).
TRACKED_TABLE = "device_lists_remote_extremeties"  # a row: the list is cached and kept current
STALE_TABLE = "device_lists_remote_resync"  # a row: the list is to be fetched again
DEVICES_TABLE = "device_lists_remote_cache"  # the cached devices
DESTINATIONS_TABLE = "destinations"  # the backoff from each remote server

# Read at start-up where the module serves the admin endpoints, so that a renamed table or
# column stops the homeserver instead of failing an operator's request.
REQUIRED_COLUMNS = {
    TRACKED_TABLE: ("user_id",),
    STALE_TABLE: ("user_id", "added_ts"),
    DEVICES_TABLE: ("user_id", "device_id"),
    DESTINATIONS_TABLE: ("destination", "failure_ts", "retry_last_ts", "retry_interval"),
}


@attrs.frozen
class RemoteUser:
    """What this homeserver holds of a remote user's device list."""

    user_id: str
    tracked: bool
    shares_room: bool
    stale_since_ms: int | None  # None: not marked stale
    device_count: int
    # Key type (`master`, `self_signing`, ...) -> `ed25519:<public key>`.
    cross_signing_keys: dict[str, str]

    @property
    def known(self) -> bool:
        return (
            self.tracked
            or self.shares_room
            or self.stale_since_ms is not None
            or self.device_count > 0
            or bool(self.cross_signing_keys)
        )


@attrs.frozen
class RemoteServer:
    """This homeserver's remote users on one server, by the state of their device lists."""

    server_name: str
    tracked_users: tuple[str, ...]
    stale_users: int
    oldest_stale_since_ms: int | None


@attrs.frozen
class Destination:
    """Synapse's backoff from a remote server (its `destinations` row)."""

    server_name: str
    failing_since_ms: int | None  # the first failure since the last success
    last_failed_attempt_ms: int | None
    retry_interval_ms: int

    @property
    def reachable(self) -> bool:
        return self.last_failed_attempt_ms is None

    @property
    def next_retry_ms(self) -> int | None:
        if self.last_failed_attempt_ms is None:
            return None
        return self.last_failed_attempt_ms + self.retry_interval_ms


def check_columns_txn(cursor: Any) -> None:
    """Select every column read here, from empty results: raises if one is missing."""
    for table, columns in REQUIRED_COLUMNS.items():
        cursor.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE 1 = 0")
        cursor.fetchall()


def _on_server(user_ids: list[str], server_name: str) -> list[str]:
    # LIKE narrows the scan; the exact test is here (SQLite's LIKE ignores case, and a
    # server name may end another one's port).
    return [u for u in user_ids if u.partition(":")[2] == server_name]


def remote_user_txn(cursor: Any, user_id: str) -> tuple[bool, int | None, int]:
    """Whether the list is tracked, since when it is stale, how many devices are cached."""
    cursor.execute(f"SELECT 1 FROM {TRACKED_TABLE} WHERE user_id = ?", (user_id,))
    tracked = cursor.fetchone() is not None
    cursor.execute(f"SELECT added_ts FROM {STALE_TABLE} WHERE user_id = ?", (user_id,))
    stale = cursor.fetchone()
    cursor.execute(f"SELECT COUNT(*) FROM {DEVICES_TABLE} WHERE user_id = ?", (user_id,))
    (devices,) = cursor.fetchone()
    stale_since = None if stale is None else int(stale[0] or 0)
    return tracked, stale_since, int(devices)


def tracked_users_txn(cursor: Any, server_name: str) -> list[str]:
    cursor.execute(
        f"SELECT user_id FROM {TRACKED_TABLE} WHERE user_id LIKE ?", (f"%:{server_name}",)
    )
    return sorted(_on_server([str(row[0]) for row in cursor.fetchall()], server_name))


def remote_server_txn(cursor: Any, server_name: str) -> RemoteServer:
    tracked = tracked_users_txn(cursor, server_name)
    cursor.execute(
        f"SELECT user_id, added_ts FROM {STALE_TABLE} WHERE user_id LIKE ?", (f"%:{server_name}",)
    )
    stale = {str(u): int(ts or 0) for u, ts in cursor.fetchall()}
    stale_on_server = _on_server(list(stale), server_name)
    oldest = min((stale[u] for u in stale_on_server), default=None)
    return RemoteServer(server_name, tuple(tracked), len(stale_on_server), oldest)


def destination_txn(cursor: Any, server_name: str) -> Destination:
    cursor.execute(
        f"SELECT failure_ts, retry_last_ts, retry_interval FROM {DESTINATIONS_TABLE}"
        " WHERE destination = ?",
        (server_name,),
    )
    row = cursor.fetchone()
    # Synapse clears `retry_last_ts` (to 0) and `failure_ts` (to NULL) on a success.
    if row is None or not row[1]:
        return Destination(server_name, None, None, 0)
    failure_ts, retry_last_ts, retry_interval = row
    return Destination(
        server_name,
        None if failure_ts is None else int(failure_ts),
        int(retry_last_ts),
        int(retry_interval or 0),
    )
