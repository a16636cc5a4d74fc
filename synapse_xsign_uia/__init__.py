"""synapse-xsign-uia: a Synapse module that owns the User-Interactive-Auth decision for
uploading cross-signing keys (`POST /_matrix/client/v3/keys/device_signing/upload`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from synapse_xsign_uia import _synapse
from synapse_xsign_uia.admin import ReplacementWindowAdmin, build_admin_window_servlet
from synapse_xsign_uia.config import Config, parse_config
from synapse_xsign_uia.notice import check_server_notices
from synapse_xsign_uia.resync import DeviceListResyncResource, register_resync_resource
from synapse_xsign_uia.upload import UploadPolicy, build_upload_servlet

if TYPE_CHECKING:
    from synapse.module_api import ModuleApi

__all__ = ["Config", "CrossSigningUIAModule"]
__version__ = "0.1.0"

logger = logging.getLogger(__name__)

UPLOAD_SERVLET = "synapse.rest.client.keys:SigningKeyUploadServlet"


class CrossSigningUIAModule:
    """The entry point named in `homeserver.yaml` under `modules:`."""

    def __init__(self, config: Config, api: ModuleApi) -> None:
        _synapse.check_synapse_version()
        self._api = api
        hs = api._hs
        _synapse.check_internals(hs)
        check_server_notices(config.notify_on_reset, hs)
        self.config = config
        self.internals = _synapse.Internals(api)
        self.upload_policy = UploadPolicy(config, api, self.internals)
        self.upload_servlet = build_upload_servlet(self.upload_policy)
        _synapse.install_servlet(UPLOAD_SERVLET, self.upload_servlet)
        self.admin_window_servlet: type | None = None
        # Synapse serves its admin API on the main process only.
        if _synapse.is_main_process(hs):
            self.admin_window_servlet = build_admin_window_servlet(
                ReplacementWindowAdmin(config, api, self.internals)
            )
            _synapse.install_servlet(_synapse.ADMIN_WINDOW_SERVLET, self.admin_window_servlet)
        self.resync_resource: DeviceListResyncResource | None = None
        if config.device_list_resync.enabled:
            self.resync_resource = register_resync_resource(
                config.device_list_resync, api, self.internals
            )
        # Listeners are built right after modules load, in the same reactor turn.
        _synapse.call_soon(hs, self._check_installed)
        logger.info(
            "synapse_xsign_uia %s loaded (%s): %s",
            __version__,
            "with workers" if self.internals.with_workers else "single process",
            config,
        )

    @staticmethod
    def parse_config(config: dict[str, Any]) -> Config:
        return parse_config(config)

    def _expected_servlets(self) -> dict[str, type]:
        hs = self.internals.hs
        expected: dict[str, type] = {}
        serves_client = "client" in _synapse.listener_resources(hs)
        # Before 1.135 Synapse serves the upload endpoint on the main process only.
        upload_on_workers = _synapse.synapse_version() >= (1, 135, 0)
        if serves_client and (_synapse.is_main_process(hs) or upload_on_workers):
            expected["the cross-signing upload servlet"] = self.upload_servlet
        if serves_client and self.admin_window_servlet is not None:
            expected["the replacement-window admin servlet"] = self.admin_window_servlet
        return expected

    def _check_installed(self) -> None:
        missing = [
            name
            for name, servlet in self._expected_servlets().items()
            if getattr(servlet, "instances", 0) == 0
        ]
        if not missing:
            logger.info("synapse_xsign_uia self-check passed: its servlets are serving")
            return
        logger.critical(
            "synapse_xsign_uia self-check FAILED: Synapse did not build %s, so the module is "
            "not in control and native behaviour applies. The module supports %s. "
            "Stopping the homeserver.",
            " and ".join(missing),
            _synapse.SUPPORTED_RANGE,
        )
        _synapse.stop_reactor(self.internals.hs)
