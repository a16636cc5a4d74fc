"""synapse-xsign-uia: a Synapse module that owns the User-Interactive-Auth decision for
uploading cross-signing keys (`POST /_matrix/client/v3/keys/device_signing/upload`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synapse_xsign_uia.config import Config
    from synapse_xsign_uia.module import CrossSigningUIAModule

__all__ = ["Config", "CrossSigningUIAModule"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported on first use rather than here, so that the parts that need no Synapse (the
    # command-line tool, the user-ID grammar) import on a machine without it. Synapse finds
    # the entry point named in homeserver.yaml with getattr, which lands here.
    if name == "CrossSigningUIAModule":
        from synapse_xsign_uia.module import CrossSigningUIAModule

        return CrossSigningUIAModule
    if name == "Config":
        from synapse_xsign_uia.config import Config

        return Config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
