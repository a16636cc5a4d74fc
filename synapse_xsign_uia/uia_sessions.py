"""Single-use UIA sessions, bound to the device and the keys they were offered for
(`strict_uia_sessions`).

Synapse keeps a completed UIA session for 48 hours and lets a request that carries only its
ID through again, from any device of the user, whatever the request asks for. For this
endpoint the module remembers, for each challenge it sends, the device it went to and the
keys it was for; when UIA has passed it asks `policy` whether the session may authorise this
write, and it marks the session spent in the transaction that stores the keys.

Spent sessions are recorded in a table of the module's, so that they hold across processes
and restarts; with workers, what each challenge was for is recorded there too (in the
background: a challenge does not wait for it), for the process that sees the session
completed. Records are deleted once Synapse's session has expired.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeGuard

from synapse_xsign_uia import policy
from synapse_xsign_uia.policy import JsonKey, SessionVerdict, UiaSessionRecord
from synapse_xsign_uia.store import SessionOffer, spend_uia_session_txn

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

    from synapse_xsign_uia._synapse import Caller, Synapse
    from synapse_xsign_uia.store import Store

logger = logging.getLogger(__name__)

# How long Synapse keeps a UIA session (`AuthHandler.SESSION_EXPIRE_MS`); a record is of no
# use after that.
SESSION_LIFETIME_MS = 48 * 60 * 60 * 1000
CLEANUP_INTERVAL_MS = 60 * 60 * 1000
# The most offers a process keeps in memory; past that the oldest are forgotten, and a
# request naming one with no credentials of its own gets a fresh challenge.
MAX_REMEMBERED_OFFERS = 100_000
# What Synapse's UIA tells the user they are authenticating for.
UIA_DESCRIPTION = "reset the device signing key on your account"


class SessionRefused(Exception):
    """The session a request presented may not authorise its write. Carries Synapse's
    challenge for a fresh session, which the servlet answers with a 401."""

    def __init__(self, verdict: SessionVerdict, challenge: Exception) -> None:
        super().__init__(f"UIA session refused: {verdict.value}")
        self.verdict = verdict
        self.challenge = challenge


def keys_fingerprint(requested: Mapping[str, JsonKey]) -> str:
    """A canonical hash of the keys of a request (by key type), the same for any order of
    fields or spacing in the body."""
    canonical = json.dumps(
        requested, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    return hashlib.sha256(canonical).hexdigest()


def brings_credentials(auth: Any) -> TypeGuard[dict[str, Any]]:
    """Whether the request's `auth` attempts a stage itself (a password, say), rather than
    only naming a session completed earlier (or out of band, as single sign-on is)."""
    return isinstance(auth, dict) and auth.get("type") is not None


class UiaSessions:
    """The bookkeeping of UIA sessions for the upload endpoint, for one process."""

    def __init__(self, synapse: Synapse, store: Store) -> None:
        self._synapse = synapse
        self._store = store
        # What this process offered, by session ID, oldest first: a challenge does not wait
        # for the database. With workers each offer is also recorded in the database, in the
        # background, for the process that sees the session completed.
        self._offers: collections.OrderedDict[str, SessionOffer] = collections.OrderedDict()
        # One process is enough to delete what has expired.
        if synapse.is_main_process:
            synapse.run_in_background("synapse_xsign_uia_expire_uia_sessions", self.expire)
            synapse.run_periodically(
                "synapse_xsign_uia_expire_uia_sessions", self.expire, CLEANUP_INTERVAL_MS
            )

    async def authenticate(
        self,
        uia: Awaitable[str | None],
        caller: Caller,
        request: SynapseRequest,
        body: Mapping[str, Any],
        requested: Mapping[str, JsonKey],
    ) -> str | None:
        """The session's verdict on Synapse's UIA (`uia`, its call for this request) for
        writing `requested`; the ID of the session that authorises the write. Raises
        Synapse's challenge (a 401) until the user has authenticated, and `SessionRefused`
        when the session may not authorise it."""
        keys = self._synapse.keys
        auth = body.get("auth")
        named = auth.get("session") if brings_credentials(auth) else None
        # A request that brings credentials waits for Synapse to check them (a password
        # hash, several round trips): the record of the session it names is read meanwhile.
        # The lock on the user's keys is held, so the record can only gain what a late
        # offer adds, which is judged as if the offer had not been recorded yet.
        early = (
            self._synapse.start(self._record_of, named, caller.user_id)
            if isinstance(named, str)
            else None
        )
        try:
            session_id = await uia
            if session_id is None:
                return None
            if early is not None and session_id == named:
                record = await early.result()
            else:
                record = await self._record_of(session_id, caller.user_id)
        except keys.uia_challenge as e:
            self.offered(keys.challenged_session(e), caller, requested, request)
            raise
        finally:
            if early is not None:
                await early.discard()
        verdict = self._judge(record, session_id, caller, requested, auth)
        if verdict is SessionVerdict.AUTHORISES:
            return session_id
        fresh = await keys.fresh_uia_challenge(caller, request, body, UIA_DESCRIPTION)
        self.offered(keys.challenged_session(fresh), caller, requested, request)
        raise SessionRefused(verdict, fresh)

    def _offer(
        self, session_id: str, caller: Caller, requested: Mapping[str, JsonKey]
    ) -> SessionOffer:
        return SessionOffer(
            session_id,
            caller.user_id,
            caller.device_id,
            keys_fingerprint(requested),
            self._synapse.now_ms(),
        )

    def offered(
        self,
        session_id: str,
        caller: Caller,
        requested: Mapping[str, JsonKey],
        request: SynapseRequest,
    ) -> None:
        """A challenge for `session_id` went to `caller` for `requested`, in answer to
        `request`. The first one counts: a wrong password is answered with the same session.

        With workers the offer is recorded in the database once the challenge is on its way,
        not before: the record's transaction would hold the challenge up. Before the client
        can complete the session it must answer the challenge, and a request that brings
        credentials is checked by Synapse (a password hash, several round trips) before the
        record is read; and if a record is late all the same, a request that brings
        credentials is authorised as one whose session no challenge offered (it could have
        started its own), and one without is challenged afresh."""
        if session_id in self._offers:
            return
        offer = self._offers[session_id] = self._offer(session_id, caller, requested)
        self._forget_old_offers(offer.at_ms)
        if self._synapse.with_workers:
            self._synapse.run_after_response(
                request, "synapse_xsign_uia_record_uia_session", self._record, offer
            )

    def _forget_old_offers(self, now_ms: int) -> None:
        while self._offers:
            oldest = next(iter(self._offers.values()))
            expired = oldest.at_ms < now_ms - SESSION_LIFETIME_MS
            if not expired and len(self._offers) <= MAX_REMEMBERED_OFFERS:
                return
            self._offers.popitem(last=False)

    async def _record(self, offer: SessionOffer) -> None:
        try:
            await self._store.record_uia_session(offer)
        except Exception:
            logger.warning(
                "Could not record UIA session %s of %s",
                offer.session_id,
                offer.user_id,
                exc_info=True,
            )

    async def _record_of(self, session_id: str, user_id: str) -> UiaSessionRecord | None:
        """What was recorded of the session, or else what this process offered."""
        record = await self._store.uia_session(session_id, user_id)
        offer = self._offers.get(session_id)
        if record is None and offer is not None and offer.user_id == user_id:
            return UiaSessionRecord(offer.device_id, offer.keys_hash, spent=False)
        return record

    def _judge(
        self,
        record: UiaSessionRecord | None,
        session_id: str,
        caller: Caller,
        requested: Mapping[str, JsonKey],
        auth: Any,
    ) -> SessionVerdict:
        """Whether the completed session `session_id`, of which `record` was recorded, may
        authorise writing `requested`."""
        verdict = policy.judge_uia_session(
            record,
            device_id=caller.device_id,
            keys_fingerprint=keys_fingerprint(requested),
            brings_credentials=brings_credentials(auth),
        )
        if verdict is not SessionVerdict.AUTHORISES:
            logger.info(
                "UIA session refused: user=%s device=%s session=%s reason=%s",
                caller.user_id,
                caller.device_id,
                session_id,
                verdict.value,
            )
        return verdict

    def spending(
        self, session_id: str, caller: Caller, requested: Mapping[str, JsonKey]
    ) -> Callable[[Any], None]:
        """What the write the session authorises runs in its own transaction to mark the
        session spent: the keys and the spending are stored together or not at all, so a
        session never authorises two writes, and a write that fails uses nothing."""
        # The record keeps what the session was offered for, if this process offered it.
        offer = self._offers.get(session_id) or self._offer(session_id, caller, requested)
        now_ms = self._synapse.now_ms()

        def spend(cursor: Any) -> None:
            spend_uia_session_txn(cursor, offer, now_ms)

        return spend

    async def expire(self) -> None:
        try:
            deleted = await self._store.delete_uia_sessions_before(
                self._synapse.now_ms() - SESSION_LIFETIME_MS
            )
        except Exception:
            logger.warning("Could not delete expired UIA session records", exc_info=True)
            return
        if deleted:
            logger.info("Deleted %d expired UIA session record(s)", deleted)
