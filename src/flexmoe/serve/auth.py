"""Who may change an owner's standing choice: the owner's bearer tokens and the admin token.

An owner's token is printed once, when it is made, and never stored: the store beside the model
(``flexmoe_owners.sqlite``, SQLite) keeps a random salt and the scrypt hash of each token, and
whether it was revoked. A token names its expert in its prefix (``fmx_<expert>_<secret>``) so a
check hashes against that expert's tokens only. Comparisons are constant-time.

The admin token comes from ``FLEXMOE_ADMIN_TOKEN`` or from a file that only its owner can read;
it is compared, never logged or stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from flexmoe.errors import FlexMoEError
from flexmoe.io import SqliteStore
from flexmoe.merge.layout import MergedModel

ADMIN_ENV = "FLEXMOE_ADMIN_TOKEN"
PREFIX = "fmx"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT, expert TEXT NOT NULL, salt BLOB NOT NULL,
    hash BLOB NOT NULL, created TEXT NOT NULL, revoked TEXT
);
"""
# scrypt with these costs takes ~10 ms: cheap for a rare opt-out, dear for guessing.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


def _hash(token: str, salt: bytes) -> bytes:
    return hashlib.scrypt(token.encode(), salt=salt, **_SCRYPT)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TokenInfo:
    id: int
    expert: str
    created: str
    revoked: str | None


class OwnerTokens(SqliteStore):
    """The token store of one merged model. Open one per thread."""

    SCHEMA = _SCHEMA
    WHAT = "the owners' token store"

    def __init__(self, model_dir: Path) -> None:
        self.model = MergedModel.open(model_dir)
        self.path = self.model.owners_file
        self._reopened()
        self._open()
        os.chmod(self.path, 0o600)  # hashes only, but nobody else needs to read them

    def _reopened(self) -> None:
        self.experts = [s.name for s in self.model.slots()[1:]]

    def _expert(self, name: str) -> str:
        if name not in self.experts:
            raise FlexMoEError(
                name, f"no such expert in this model (experts: {', '.join(self.experts)})"
            )
        return name

    def add(self, expert: str) -> str:
        """A new token for ``expert``'s owner; returned once, only its hash is kept."""
        self._expert(expert)
        token = f"{PREFIX}_{expert}_{secrets.token_urlsafe(32)}"
        salt = secrets.token_bytes(16)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        digest = _hash(token, salt)
        with self.transaction("add the token") as db:
            self._expert(expert)  # again: the model may have changed while we waited
            db.execute(
                "INSERT INTO tokens (expert, salt, hash, created) VALUES (?, ?, ?, ?)",
                (expert, salt, digest, now),
            )
        return token

    def revoke(self, expert: str, token_id: int | None = None) -> int:
        """Revoke one token of ``expert`` (by id) or all of them; returns how many."""
        self._expert(expert)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        query = "UPDATE tokens SET revoked = ? WHERE expert = ? AND revoked IS NULL"
        args: tuple[object, ...] = (now, expert)
        if token_id is not None:
            query, args = query + " AND id = ?", (*args, token_id)
        with self.transaction("revoke the token") as db:
            return db.execute(query, args).rowcount

    def list(self) -> list[TokenInfo]:
        rows = self._current().execute(
            "SELECT id, expert, created, revoked FROM tokens ORDER BY id"
        )
        return [TokenInfo(*row) for row in rows]

    def owner_of(self, token: str) -> str | None:
        """The expert whose live token this is, or None."""
        named = [e for e in self.experts if token.startswith(f"{PREFIX}_{e}_")]
        for expert in sorted(named, key=len, reverse=True):
            rows = (
                self._current()
                .execute(
                    "SELECT salt, hash FROM tokens WHERE expert = ? AND revoked IS NULL", (expert,)
                )
                .fetchall()
            )
            found = False
            for salt, digest in rows:  # check them all: the time does not say which matched
                found |= hmac.compare_digest(_hash(token, salt), digest)
            if found:
                return expert
        return None


def read_admin_token(path: Path | None) -> str | None:
    """The admin token from ``path`` (must be readable by its owner only) or the environment."""
    if path is not None:
        path = Path(path)
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise FlexMoEError(path, "admin token file not found") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise FlexMoEError(path, "admin token file is readable by others; chmod 600 it")
        token = path.read_text().strip()
        if len(token) < 16:
            raise FlexMoEError(path, "admin token must be at least 16 characters")
        return token
    token = os.environ.get(ADMIN_ENV, "").strip()
    if token and len(token) < 16:
        raise FlexMoEError(ADMIN_ENV, "admin token must be at least 16 characters")
    return token or None


def is_admin(token: str, admin: str | None) -> bool:
    return admin is not None and hmac.compare_digest(token.encode(), admin.encode())
