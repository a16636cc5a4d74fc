"""The module's refusals as Matrix errors (`errcode` and `error`, with the HTTP status)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from synapse.module_api.errors import SynapseError

from synapse_xsign_uia.body import read_json_object
from synapse_xsign_uia.validation import RequestError

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest


def matrix_error(error: RequestError) -> SynapseError:
    return SynapseError(error.status, error.message, error.errcode)


def read_json_body(request: SynapseRequest, *, allow_empty_body: bool = False) -> dict[str, Any]:
    """The request's JSON body, read strictly (see `body.py`): Synapse's own reader keeps the
    last of duplicate keys and lets `1e999` through to fail in storage."""
    try:
        return read_json_object(request.content, allow_empty_body=allow_empty_body)
    except RequestError as e:
        raise matrix_error(e) from e
