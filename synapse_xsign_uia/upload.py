"""`POST /_matrix/client/v3/keys/device_signing/upload`, top to bottom: authenticate, read
the request, gather the facts, let `policy` decide, carry the decision out.

Every decision is `policy`'s; this file only does what a decision says, and logs and counts
what it came to.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs
from synapse.module_api.errors import Codes, SynapseError

from synapse_xsign_uia import metrics, policy, validation
from synapse_xsign_uia.errors import matrix_error, read_json_body
from synapse_xsign_uia.outcomes import AdminAction, UploadOutcome, UploadResult
from synapse_xsign_uia.policy import Action, Decision, Facts, Forecast, JsonKey, Rule, Toggles
from synapse_xsign_uia.store import LockLost
from synapse_xsign_uia.uia_sessions import UIA_DESCRIPTION, SessionRefused, UiaSessions

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

    from synapse_xsign_uia._synapse import Caller, Native, Started, StoredState, Synapse
    from synapse_xsign_uia.config import Config
    from synapse_xsign_uia.notice import ResetNotifier
    from synapse_xsign_uia.store import Store
    from synapse_xsign_uia.user_lock import UserLock

logger = logging.getLogger(__name__)

Answer = tuple[int, Any]


@attrs.frozen
class Attempt:
    """One upload request, as read: who sends which keys."""

    caller: Caller
    request: SynapseRequest = attrs.field(eq=False, repr=False)
    body: Mapping[str, Any] = attrs.field(repr=False)
    # Key type (`master`, ...) -> the key in the request.
    requested: Mapping[str, JsonKey]

    @property
    def user_id(self) -> str:
        return self.caller.user_id

    @property
    def auth_sent(self) -> bool:
        # `"auth": null` is no authentication, as Synapse reads it.
        return self.body.get("auth") is not None


class UploadHandler:
    """The upload endpoint for one homeserver process."""

    def __init__(
        self,
        config: Config,
        synapse: Synapse,
        store: Store,
        lock: UserLock,
        notifier: ResetNotifier,
    ) -> None:
        self._synapse = synapse
        self._store = store
        self._lock = lock
        self._notifier = notifier
        self._sessions = UiaSessions(synapse, store) if config.strict_uia_sessions else None
        self._toggles = Toggles(
            first_upload_without_uia=config.first_upload_without_uia,
            identical_reupload_without_uia=config.identical_reupload_without_uia,
            appservice_without_uia=config.appservice_without_uia,
        )
        self._metrics = metrics.for_server(synapse.server_name)

    @property
    def handlers(self) -> dict[str, Any]:
        """The servlet's methods."""
        return {"on_POST": self.handle}

    async def handle(self, request: SynapseRequest, native: Native) -> Answer:
        caller = await self._synapse.requests.caller(request)
        body = read_json_body(request)
        keys = self._synapse.keys
        with self._decision_logged(caller.user_id, None):
            attempt = _attempt(caller, request, body)
            # Answers that write nothing need no lock, and come from Synapse's cache.
            cached = keys.cached(caller.user_id, attempt.requested.keys())
            early = policy.decide_early(self._toggles, attempt.requested, cached)
            if early is not None:
                return self._answer(attempt, early.rule, UploadOutcome.NOTHING_WRITTEN)
            validation.check_keys(attempt.requested, caller.user_id)
        public_keys = [validation.public_key(key) for key in attempt.requested.values()]
        # The cache holds no window: the forecast takes it as closed.
        cached_facts = None if cached is None else self._facts(attempt, cached, None, cached)
        forecast = policy.forecast(self._toggles, cached_facts, attempt.auth_sent)
        if forecast is not Forecast.WRITE:
            answer = await self._without_lock(attempt, public_keys, cached, native, forecast)
            if answer is not None:
                return answer
        reading = keys.stored_state_reading(caller.user_id, public_keys)
        async with self._lock.hold_reading(caller.user_id, reading, request) as stored:
            # Decided on what the lock's read returns: another request may have written the
            # keys since a read without the lock.
            decision = policy.decide(
                self._toggles, self._facts(attempt, stored.keys, stored.window_expires_ms, cached)
            )
            with self._decision_logged(caller.user_id, decision.rule):
                return await self._carry_out(attempt, decision, stored, native, locked=True)

    async def _without_lock(
        self,
        attempt: Attempt,
        public_keys: list[str],
        cached: Mapping[str, JsonKey] | None,
        native: Native,
        forecast: Forecast,
    ) -> Answer | None:
        """The answer to a request that writes nothing, decided on the stored state read
        without the lock, as if it had come just before any write now in progress; None
        where the decision may write, to be made again under the lock."""
        challenge = self._start_challenge(attempt) if forecast is Forecast.CHALLENGE else None
        try:
            stored = await self._synapse.keys.stored_state(attempt.user_id, public_keys)
            decision = policy.decide(
                self._toggles, self._facts(attempt, stored.keys, stored.window_expires_ms, cached)
            )
            if policy.needs_lock(decision, attempt.auth_sent):
                return None
            with self._decision_logged(attempt.user_id, decision.rule):
                return await self._carry_out(
                    attempt, decision, stored, native, locked=False, challenge=challenge
                )
        finally:
            if challenge is not None:
                # Not answered: Synapse's UIA ends before the request goes on or ends.
                await challenge.discard()

    def _start_challenge(self, attempt: Attempt) -> Started[str | None]:
        """Synapse's UIA, started before the stored state is read where the cached keys
        forecast a challenge, so that the challenge is ready when the decision is. A
        challenge takes Synapse's UIA several database round trips; the read no longer adds
        its own to them."""
        return self._synapse.start(
            self._synapse.keys.user_interactive_auth,
            attempt.caller,
            attempt.request,
            attempt.body,
            UIA_DESCRIPTION,
        )

    def _facts(
        self,
        attempt: Attempt,
        stored: Mapping[str, JsonKey],
        window_expires_ms: int | None,
        cached: Mapping[str, JsonKey] | None,
    ) -> Facts:
        return Facts(
            requested=attempt.requested,
            stored=stored,
            is_appservice=attempt.caller.is_appservice,
            delegated_auth=self._synapse.delegated_auth,
            window_expires_ms=window_expires_ms,
            now_ms=self._synapse.now_ms(),
            can_do_uia=attempt.caller.has_user_token,
            cache_missed=cached is None,
        )

    async def _carry_out(
        self,
        attempt: Attempt,
        decision: Decision,
        stored: StoredState,
        native: Native,
        *,
        locked: bool,
        challenge: Started[str | None] | None = None,
    ) -> Answer:
        if decision.refresh_cache and not policy.needs_lock(decision, attempt.auth_sent):
            self._synapse.keys.warm_cache(attempt.user_id, attempt.request)
        if decision.action is Action.NOTHING:
            return self._answer(attempt, decision.rule, UploadOutcome.NOTHING_WRITTEN)
        written = policy.changed_keys(attempt.requested, stored.keys)
        validation.check_replacements(written, stored.keys, stored.taken_device_ids)
        if decision.action is Action.DELEGATE:
            # Synapse's own delegated-auth answer, still under the lock.
            status, result = await native(attempt.request)
            self._log(
                attempt.user_id, decision.rule, UploadResult(UploadOutcome.DELEGATED, str(status))
            )
            return status, result
        if decision.action is Action.REFUSE:
            raise SynapseError(
                403,
                "This requester cannot complete user-interactive authentication, which is "
                "required to replace existing cross-signing keys",
                Codes.FORBIDDEN,
            )
        session_id = None
        if decision.action is Action.REQUIRE_UIA:
            session_id = await self._user_interactive_auth(attempt, challenge)
        if not written:
            return self._answer(attempt, decision.rule, UploadOutcome.NOTHING_WRITTEN)
        if not locked:
            # Synapse's UIA passed a request without `auth`, which it never does: write
            # nothing outside the lock, and challenge, so that the retry takes it.
            logger.error("UIA passed without authentication for %s; challenging", attempt.user_id)
            raise await self._synapse.keys.fresh_uia_challenge(
                attempt.caller, attempt.request, attempt.body, UIA_DESCRIPTION
            )
        # Signatures are checked after UIA, as Synapse does: a challenge costs no signature
        # verification.
        validation.check_signatures(attempt.requested, stored.keys, attempt.user_id)
        await self._write(attempt, written, session_id)
        await self._after_write(attempt, decision.rule, stored, written)
        return self._answer(attempt, decision.rule, UploadOutcome.UPLOADED)

    async def _user_interactive_auth(
        self, attempt: Attempt, started: Started[str | None] | None
    ) -> str | None:
        """Synapse's UIA (or its result, where `_start_challenge` started it), and with
        `strict_uia_sessions` the session's verdict; the session that authorises the write.
        Raises the challenge (a 401) until the user has authenticated."""
        validation.check_uia_auth(attempt.body.get("auth"))
        if started is not None:
            uia = started.result()
        else:
            uia = self._synapse.keys.user_interactive_auth(
                attempt.caller, attempt.request, attempt.body, UIA_DESCRIPTION
            )
        if self._sessions is None:
            await uia
            return None
        return await self._sessions.authenticate(
            uia, attempt.caller, attempt.request, attempt.body, attempt.requested
        )

    async def _write(
        self, attempt: Attempt, written: Mapping[str, JsonKey], session_id: str | None
    ) -> None:
        """Store the keys, in one transaction with the end of the lock's lease (with
        workers) and the spending of the UIA session that authorised them
        (`strict_uia_sessions`)."""
        in_transaction = []
        fence = self._lock.fence(attempt.user_id)
        if fence is not None:
            in_transaction.append(fence)
        if self._sessions is not None and session_id is not None:
            in_transaction.append(
                self._sessions.spending(session_id, attempt.caller, attempt.requested)
            )
        await self._synapse.keys.store(attempt.user_id, written, in_transaction)
        if fence is not None:
            self._lock.written(attempt.user_id)

    async def _after_write(
        self, attempt: Attempt, rule: Rule, stored: StoredState, written: Mapping[str, JsonKey]
    ) -> None:
        consequences = policy.consequences(rule, stored.keys, written)
        if consequences.resets_identity:
            self._metrics.identity_reset(rule)
            self._notifier.master_replaced(attempt.caller, rule)
        if consequences.through_window:
            await self._audit_window(attempt.user_id, written, consequences.spends_window)

    async def _audit_window(
        self, user_id: str, written: Mapping[str, JsonKey], spent: bool
    ) -> None:
        """Log who granted the window a write went through."""
        try:
            grantor = await self._store.window_grantor(user_id, master_replaced=spent)
        except Exception:
            # The keys are already stored: a failed look-up must not fail the request.
            logger.warning("Could not look up who granted %s's window", user_id, exc_info=True)
            grantor = None
        logger.info(
            "Cross-signing keys replaced through an admin-granted window: user=%s admin=%s keys=%s",
            user_id,
            grantor or "unknown (not granted through this module)",
            ",".join(sorted(written)),
        )
        if spent:
            self._metrics.admin_window(AdminAction.USED)

    @contextlib.contextmanager
    def _decision_logged(self, user_id: str, rule: Rule | None) -> Iterator[None]:
        """Log and count a refusal or a UIA challenge under `rule` (None: before a row was
        chosen), answering the module's own refusals as Matrix errors."""
        try:
            yield
        except validation.RequestError as e:
            self._log(user_id, rule, UploadResult(UploadOutcome.REFUSED, e.errcode))
            raise matrix_error(e) from e
        except SessionRefused as e:
            self._log(
                user_id, rule, UploadResult(UploadOutcome.UIA_SESSION_REFUSED, e.verdict.value)
            )
            raise e.challenge from None
        except self._synapse.keys.uia_challenge:
            self._log(user_id, rule, UploadResult(UploadOutcome.UIA_CHALLENGE))
            raise
        except LockLost as e:
            logger.warning("Nothing written for %s: %s", user_id, e)
            self._log(user_id, rule, UploadResult(UploadOutcome.LOCK_LOST))
            raise SynapseError(
                503,
                "The server was held up for longer than it may keep the lock on your keys, so "
                "nothing was stored: try again",
                Codes.UNKNOWN,
            ) from e
        except SynapseError as e:
            # Synapse's errcodes are `Codes` members, whose `format()` gives the member name
            # (`Codes.FORBIDDEN`) from Python 3.11.
            errcode = str(getattr(e.errcode, "value", e.errcode))
            self._log(user_id, rule, UploadResult(UploadOutcome.REFUSED, errcode))
            raise

    def _answer(self, attempt: Attempt, rule: Rule, outcome: UploadOutcome) -> Answer:
        self._log(attempt.user_id, rule, UploadResult(outcome))
        return 200, {}

    def _log(self, user_id: str, rule: Rule | None, result: UploadResult) -> None:
        logger.info(
            "cross-signing upload decision: user=%s rule=%s outcome=%s",
            user_id,
            metrics.VALIDATION if rule is None else rule.value,
            result.label,
        )
        self._metrics.upload_decision(rule, result)


def _attempt(caller: Caller, request: SynapseRequest, body: Mapping[str, Any]) -> Attempt:
    validation.check_body_shape(body)
    return Attempt(caller, request, body, policy.requested_keys(body))
