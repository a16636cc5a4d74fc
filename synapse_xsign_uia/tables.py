"""Tables of the module's own in Synapse's database, created on first use in each process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synapse.module_api import ModuleApi


class ModuleTable:
    """A table created with `CREATE TABLE IF NOT EXISTS` the first time a process uses it.

    Two creations at once (two requests of one process, or two processes) can collide on
    PostgreSQL, which checks the catalog before it locks it; the loser finds the table
    there on a second try.
    """

    def __init__(self, api: ModuleApi, name: str, columns: str) -> None:
        self.name = name
        self._api = api
        self._create = f"CREATE TABLE IF NOT EXISTS {name} ({columns})"
        self._ready = False

    async def ensure(self) -> None:
        if self._ready:
            return

        def txn(cursor: Any) -> None:
            cursor.execute(self._create)

        description = f"{self.name}_create"
        try:
            await self._api.run_db_interaction(description, txn)
        except Exception:
            await self._api.run_db_interaction(description, txn)
        self._ready = True
