"""The identity-reset email: the reset notice, sent to each of the user's verified email
addresses as well (`notify_on_reset.email`).

The server notice goes to the account that was just reset, whose new holder can read it and
leave the room; an email reaches the user outside the account.
"""

from __future__ import annotations

import html
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from synapse_xsign_uia._synapse import Synapse

logger = logging.getLogger(__name__)


def email_subject(server_name: str) -> str:
    return f"Your cross-signing identity on {server_name} was replaced"


def email_html(text: str) -> str:
    """The text as HTML: a paragraph per blank-line-separated block."""
    paragraphs = [block.strip() for block in text.split("\n\n") if block.strip()]
    body = "\n".join(
        "<p>" + html.escape(block).replace("\n", "<br>\n") + "</p>" for block in paragraphs
    )
    return f"<!DOCTYPE html>\n<html><body>\n{body}\n</body></html>\n"


async def send_reset_email(synapse: Synapse, user_id: str, text: str) -> int:
    """Send `text` to each verified email address of the user; how many were sent to."""
    sent = 0
    for address in await synapse.email_addresses(user_id):
        try:
            await synapse.send_email(
                address, email_subject(synapse.server_name), email_html(text), text
            )
        except Exception:
            logger.warning(
                "Could not send the identity-reset email to %s's address %s",
                user_id,
                address,
                exc_info=True,
            )
            continue
        sent += 1
    return sent
