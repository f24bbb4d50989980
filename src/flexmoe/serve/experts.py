"""The experts service: who is in the served model, the owners' opt-outs and opt-ins (an owner's
token for its own expert, or the admin token), and each expert's usage from the ledger."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flexmoe.merge.slots import SlotInfo
from flexmoe.merge.standing import StandingStore
from flexmoe.serve.auth import OwnerTokens, is_admin
from flexmoe.serve.ledger import Ledger
from flexmoe.serve.limits import FailureLimiter
from flexmoe.serve.protocol import (
    ApiError,
    ExpertEntry,
    ExpertList,
    ExpertUsage,
    OptRequest,
    OptResponse,
)


@dataclass
class ExpertService:
    """The experts of the merged model at ``model_dir``; every call reads its stores anew."""

    model_dir: Path
    slots: list[SlotInfo]
    admin_token: str | None
    routing_tuned: bool
    limiter: FailureLimiter = field(default_factory=FailureLimiter)

    def list(self) -> ExpertList:
        with StandingStore(self.model_dir) as store:
            statuses = store.statuses()
        return ExpertList(
            data=[
                ExpertEntry(
                    name=st.slot.name,
                    owner=st.slot.owner,
                    license=st.slot.license,
                    slot=st.slot.index,
                    public=st.slot.index == 0,
                    status="opted-out" if st.opted_out else "active",
                    reason=st.reason,
                    updated=st.updated,
                    routing_tuned=self.routing_tuned,
                )
                for st in statuses
            ]
        )

    def known(self, expert: str, *, changeable: bool = True) -> None:
        """404 for a name the model lacks; 400 for the public expert where a change is asked."""
        names = [slot.name for slot in self.slots]
        if expert not in names:
            raise ApiError(
                404, f"no expert {expert!r} in this model", param="name", code="expert_not_found"
            )
        if changeable and expert == names[0]:
            raise ApiError(400, "the public expert is always active", param="name")

    async def authorise(self, token: str, client: str, expert: str) -> str:
        """Who may change ``expert``'s standing with ``token``: ``admin`` or ``owner:NAME``
        (:meth:`identify`)."""
        who = await self.identify(token, client)
        if who is None:
            raise ApiError(401, "the token is not valid", kind="authentication_error")
        owner = who.removeprefix("owner:")
        if who != "admin" and owner != expert:
            raise ApiError(
                403,
                f"this token belongs to the {owner} expert's owner, not {expert}'s",
                kind="permission_error",
            )
        return who

    async def identify(self, token: str, client: str) -> str | None:
        """Who ``token`` is: ``admin``, ``owner:NAME`` or None. Failed attempts are limited per
        ``client`` address; the scrypt check runs off the event loop."""
        self.limiter.begin(client)
        owner: str | None = None
        admin = is_admin(token, self.admin_token)
        try:
            if not admin:
                owner = await asyncio.to_thread(self._owner_of, token)
        finally:
            self.limiter.end(client, failed=not admin and owner is None)
        return "admin" if admin else f"owner:{owner}" if owner else None

    def _owner_of(self, token: str) -> str | None:
        with OwnerTokens(self.model_dir) as tokens:
            return tokens.owner_of(token)

    def set(
        self, expert: str, *, opted_out: bool, body: OptRequest, actor: str, via: str = "api"
    ) -> OptResponse:
        """Record the change (and its audit row, ``via`` the API or the page): it applies from
        the next request on."""
        with StandingStore(self.model_dir) as store:
            store.set(expert, opted_out=opted_out, reason=body.reason, actor=f"{via} {actor}")
        return OptResponse(name=expert, status="opted-out" if opted_out else "active")

    def usage(self, expert: str) -> ExpertUsage:
        self.known(expert, changeable=False)
        with Ledger(self.model_dir) as ledger:
            return ExpertUsage(name=expert, **asdict(ledger.expert_usage(expert)))


def parse_opt_request(raw: bytes) -> OptRequest:
    """The optional body of an opt-out or opt-in: ``{"reason": "..."}``."""
    try:
        return OptRequest.model_validate_json(raw) if raw.strip() else OptRequest()
    except ValueError:
        raise ApiError(
            400,
            'the body must be {"reason": "..."} (at most 500 characters)',
            param="reason",
        ) from None
