"""The module's entry point, `CrossSigningUIAModule`, which Synapse builds at start-up."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from synapse_xsign_uia import __version__, _synapse
from synapse_xsign_uia._synapse import NativeServlet, Synapse
from synapse_xsign_uia.admin import PATTERNS as ADMIN_WINDOW_PATTERNS
from synapse_xsign_uia.admin import ReplacementWindowAdmin
from synapse_xsign_uia.config import Config, parse_config
from synapse_xsign_uia.device_list_admin import FetchRecorder, serve_device_list_admin
from synapse_xsign_uia.notice import ResetNotifier, check_notice_config
from synapse_xsign_uia.resync import serve_resync_endpoint
from synapse_xsign_uia.store import Store
from synapse_xsign_uia.upload import UploadHandler
from synapse_xsign_uia.user_lock import UserLock

if TYPE_CHECKING:
    from synapse.module_api import ModuleApi

# The package's name, as before this class had a module of its own: logging configurations
# and log searches name it.
logger = logging.getLogger("synapse_xsign_uia")


class CrossSigningUIAModule:
    """The entry point named in `homeserver.yaml` under `modules:`: builds the parts and
    puts them where Synapse will call them."""

    def __init__(self, config: Config, api: ModuleApi) -> None:
        _synapse.check_synapse_version()
        self.config = config
        self.synapse = synapse = Synapse(api)
        check_notice_config(config.notify_on_reset, synapse)
        self.store = store = Store(synapse)
        synapse.run_in_background("synapse_xsign_uia_create_tables", store.create_tables)
        lock = UserLock(synapse, store)
        notifier = ResetNotifier(config.notify_on_reset, synapse, store)
        upload = UploadHandler(config, synapse, store, lock, notifier)
        self.servlets = {
            NativeServlet.UPLOAD: synapse.replace_servlet(NativeServlet.UPLOAD, upload.handlers)
        }
        if synapse.is_main_process:
            admin = ReplacementWindowAdmin(config, synapse, store, lock)
            self.servlets[NativeServlet.ADMIN_WINDOW] = synapse.replace_servlet(
                NativeServlet.ADMIN_WINDOW, admin.handlers, ADMIN_WINDOW_PATTERNS
            )
        if config.device_list_resync.enabled:
            serve_resync_endpoint(config.device_list_resync, synapse, store)
        self.admin_routes: list[Any] = []
        if config.device_list_repair.enabled:
            FetchRecorder(synapse, store)
            if synapse.is_main_process:
                self.admin_routes = serve_device_list_admin(synapse, store)
                synapse.run_in_background(
                    "synapse_xsign_uia_check_device_list_tables", self._check_device_list_tables
                )
        # Listeners are built right after modules load, in the same reactor turn.
        synapse.call_later(0, self._check_installed)
        logger.info(
            "synapse_xsign_uia %s loaded (%s): %s",
            __version__,
            "with workers" if synapse.with_workers else "single process",
            config,
        )

    @staticmethod
    def parse_config(config: dict[str, Any]) -> Config:
        return parse_config(config)

    def _check_installed(self) -> None:
        missing = [
            servlet.description
            for servlet, replacement in self.servlets.items()
            if self.synapse.serves(servlet) and not _synapse.was_built(replacement)
        ]
        if self.synapse.serves_admin_api and any(
            route.registrations == 0 for route in self.admin_routes
        ):
            missing.append("the remote device-list admin endpoints")
        if not missing:
            logger.info("synapse_xsign_uia self-check passed: its servlets are serving")
            return
        self._fail(
            f"Synapse did not build {' and '.join(missing)}, so the module is not in control "
            "and native behaviour applies"
        )

    async def _check_device_list_tables(self) -> None:
        try:
            await self.synapse.device_lists().check_tables()
        except Exception as e:
            self._fail(f"Synapse's device-list tables are not as the module reads them ({e})")

    def _fail(self, reason: str) -> None:
        logger.critical(
            "synapse_xsign_uia self-check FAILED: %s. The module supports %s. "
            "Stopping the homeserver.",
            reason,
            _synapse.SUPPORTED_RANGE,
        )
        self.synapse.stop()
