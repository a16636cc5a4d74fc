"""Server notices, for the identity-reset notice."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from synapse_xsign_uia._synapse.support import require_attribute

if TYPE_CHECKING:
    from synapse.server import HomeServer


def server_notices_mxid(hs: HomeServer) -> str | None:
    """The system user that sends server notices; None when `server_notices` is not set in
    homeserver.yaml."""
    config: Any = hs.config
    section = require_attribute(config, "servernotices", "HomeServer.config.servernotices")
    mxid = require_attribute(
        section, "server_notices_mxid", "HomeServer.config.servernotices.server_notices_mxid"
    )
    return None if mxid is None else str(mxid)


async def send_server_notice(hs: HomeServer, user_id: str, content: Mapping[str, Any]) -> None:
    """Send a message to the user's server-notices room, creating and inviting them to it
    if needed. Main process only: Synapse refuses to build its server-notices manager on a
    worker ("Workers cannot send server notices"), as each process would otherwise keep its
    own cache of which room is the user's and could create a second one."""
    manager: Any = hs.get_server_notices_manager()
    await manager.send_notice(user_id, dict(content))
