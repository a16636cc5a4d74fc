"""`POST /_matrix/client/v3/keys/device_signing/upload`: glue between the HTTP request, the
decision table and Synapse's handlers."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from synapse.api.errors import SynapseError

from synapse_xsign_uia import _synapse, metrics, policy, validation
from synapse_xsign_uia.config import Config
from synapse_xsign_uia.notice import ResetNotifier
from synapse_xsign_uia.policy import Action, Decision, Facts, Rule, Toggles
from synapse_xsign_uia.validation import RequestError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from synapse.http.site import SynapseRequest
    from synapse.module_api import ModuleApi

    NativeHandler = Callable[[SynapseRequest], Awaitable[tuple[int, Any]]]

logger = logging.getLogger(__name__)


class UploadPolicy:
    """Carries out the decision table for one homeserver process."""

    def __init__(self, config: Config, api: ModuleApi, internals: _synapse.Internals) -> None:
        self._api = api
        self._internals = internals
        self._toggles = Toggles(
            first_upload_without_uia=config.first_upload_without_uia,
            identical_reupload_without_uia=config.identical_reupload_without_uia,
            appservice_without_uia=config.appservice_without_uia,
        )
        self._delegated_auth = _synapse.delegated_auth_enabled(internals.hs)
        self._incomplete_uia = _synapse.resolve("synapse.api.errors:InteractiveAuthIncompleteError")
        self._reset_notifier = ResetNotifier(config.notify_on_reset, api, internals)
        self._metrics = metrics.for_server(api.server_name)

    async def handle(self, request: SynapseRequest, native: NativeHandler) -> tuple[int, Any]:
        requester = await _synapse.get_user_by_req(self._api, request)
        user_id = requester.user.to_string()
        body = _synapse.parse_json_object(request)
        rule: Rule | None = None
        try:
            validation.check_body_shape(body)
            requested = policy.requested_keys(body)
            if not requested:
                rule = Rule.NO_KEYS
                return self._done(user_id, rule, "nothing_written")

            # Answering "already stored" writes nothing, so it needs no lock.
            cached: dict[str, Any] | None = None
            if self._toggles.identical_reupload_without_uia:
                cached = self._internals.cached_keys(user_id, requested.keys())
                if cached is not None and policy.is_identical(requested, cached):
                    rule = Rule.IDENTICAL_REUPLOAD
                    return self._done(user_id, rule, "nothing_written")

            validation.check_keys(requested, user_id)
            async with self._internals.upload_lock(user_id):
                stored = await self._internals.read_stored_state(
                    user_id, [validation.public_key(key) for key in requested.values()]
                )
                decision = policy.decide(
                    self._toggles,
                    Facts(
                        requested=requested,
                        stored=stored.keys,
                        is_appservice=_synapse.is_appservice(requester),
                        delegated_auth=self._delegated_auth,
                        window_expires_ms=stored.window_expires_ms,
                        now_ms=self._internals.now_ms(),
                    ),
                )
                rule = decision.rule
                if decision.action is Action.NOTHING:
                    if rule is Rule.IDENTICAL_REUPLOAD and cached is None:
                        self._internals.warm_keys_cache(user_id)
                    return self._done(user_id, rule, "nothing_written")

                changed = policy.changed_keys(requested, stored.keys)
                validation.check_replacements(changed, stored.keys, stored.taken_device_ids)
                return await self._act(
                    decision,
                    request,
                    requester,
                    body,
                    requested,
                    stored.keys,
                    changed,
                    native,
                    replaces_master="master" in changed and "master" in stored.keys,
                )
        except RequestError as e:
            self._log(user_id, rule, f"refused:{e.errcode}")
            raise SynapseError(e.status, e.message, e.errcode) from e
        except self._incomplete_uia:
            self._log(user_id, rule, "uia_challenge")
            raise
        except SynapseError as e:
            # Synapse's errcodes are `Codes` members, whose `format()` gives the member name
            # (`Codes.FORBIDDEN`) from Python 3.11.
            self._log(user_id, rule, f"refused:{getattr(e.errcode, 'value', e.errcode)}")
            raise

    async def _act(
        self,
        decision: Decision,
        request: SynapseRequest,
        requester: Any,
        body: dict[str, Any],
        requested: dict[str, policy.JsonKey],
        stored: Mapping[str, policy.JsonKey],
        changed: dict[str, policy.JsonKey],
        native: NativeHandler,
        *,
        replaces_master: bool,
    ) -> tuple[int, Any]:
        user_id = requester.user.to_string()
        if decision.action is Action.DELEGATE:
            # Synapse's own delegated-auth answer, still under the lock.
            status, result = await native(request)
            self._log(user_id, decision.rule, f"delegated:{status}")
            return status, result
        if decision.action is Action.REQUIRE_UIA:
            await self._internals.validate_uia(requester, request, body)
        if changed:
            # Signatures are checked after UIA, as Synapse does: a challenge costs no
            # signature verification. Synapse verifies the keys it is given before writing
            # any of them; the requested keys it is not given (already stored) are checked
            # here, against the master key of the request.
            validation.check_signatures(
                {k: v for k, v in requested.items() if k == "master" or k not in changed},
                stored,
                user_id,
            )
            fields = {
                field: changed[key_type]
                for field, key_type in policy.KEY_FIELDS.items()
                if key_type in changed
            }
            await self._internals.upload_keys(user_id, fields)
            if replaces_master:
                self._metrics.identity_reset(decision.rule.value)
                self._reset_notifier.master_replaced(user_id, decision.rule)
            if decision.rule is Rule.REPLACEMENT_WINDOW:
                grantor = await self._internals.windows.grantor(
                    user_id, master_replaced="master" in changed
                )
                logger.info(
                    "Cross-signing keys replaced through an admin-granted window: user=%s "
                    "admin=%s keys=%s",
                    user_id,
                    grantor or "unknown (not granted through this module)",
                    ",".join(sorted(changed)),
                )
                if "master" in changed:
                    # New sub-keys alone leave the window open for the reset it was for.
                    self._metrics.admin_window(metrics.USED)
            return self._done(user_id, decision.rule, "uploaded")
        return self._done(user_id, decision.rule, "nothing_written")

    def _done(self, user_id: str, rule: Rule, outcome: str) -> tuple[int, Any]:
        self._log(user_id, rule, outcome)
        return 200, {}

    def _log(self, user_id: str, rule: Rule | None, outcome: str) -> None:
        rule_name = rule.value if rule is not None else metrics.VALIDATION
        logger.info(
            "cross-signing upload decision: user=%s rule=%s outcome=%s",
            user_id,
            rule_name,
            outcome,
        )
        self._metrics.upload_decision(rule_name, outcome)


def build_upload_servlet(upload_policy: UploadPolicy) -> type:
    """A subclass of Synapse's own upload servlet whose `on_POST` follows the decision table.

    It keeps the native class name, so Synapse's per-servlet request metrics stay continuous.
    """
    native: Any = _synapse.native_upload_servlet()
    interactive_auth_handler = _synapse.interactive_auth_handler()

    class SigningKeyUploadServlet(native):  # type: ignore[misc,valid-type]
        native_class = native
        instances = 0

        def __init__(self, hs: Any) -> None:
            super().__init__(hs)
            SigningKeyUploadServlet.instances += 1

        @interactive_auth_handler
        async def on_POST(self, request: SynapseRequest) -> tuple[int, Any]:
            return await upload_policy.handle(request, self._native_on_post)

        async def _native_on_post(self, request: SynapseRequest) -> tuple[int, Any]:
            _synapse.rewind_request(request)
            return await native.on_POST(self, request)  # type: ignore[no-any-return]

    SigningKeyUploadServlet.__module__ = __name__
    return SigningKeyUploadServlet
