"""Server notices, for the identity-reset notice."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from synapse_xsign_uia._synapse.support import require_attribute

if TYPE_CHECKING:
    from synapse.server import HomeServer


class ServerNotices:
    """Synapse's server notices: messages from a system user in a room of their own."""

    def __init__(self, hs: HomeServer) -> None:
        self._hs = hs

    def sender(self) -> str | None:
        """The system user that sends server notices; None when `server_notices` is not set
        in homeserver.yaml."""
        config: Any = self._hs.config
        section = require_attribute(config, "servernotices", "HomeServer.config.servernotices")
        mxid = require_attribute(
            section, "server_notices_mxid", "HomeServer.config.servernotices.server_notices_mxid"
        )
        return None if mxid is None else str(mxid)

    async def send(self, user_id: str, content: Mapping[str, Any]) -> None:
        """Send a message to the user's server-notices room, creating and inviting them to
        it if needed. Main process only: Synapse refuses to build its server-notices manager
        on a worker ("Workers cannot send server notices"), as each process would otherwise
        keep its own cache of which room is the user's and could create a second one."""
        manager: Any = self._hs.get_server_notices_manager()
        await manager.send_notice(user_id, dict(content))
