"""The coordinator's registry of owners' public keys (SQLite, WAL, durable commits).

Each key is registered for one owner, by fingerprint, and may be revoked: a package signed with a
revoked key is refused from then on, whenever it was signed. The registry's policy says whether
``merge`` and ``merge add`` require every package to be signed (the default) or also take
unsigned ones; a signed package is always checked, whatever the policy.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from flexmoe.errors import FlexMoEError
from flexmoe.expert.signing import SIGNATURE_FILE, PublicKeyFile, Signature, Signer
from flexmoe.io import SqliteStore, open_sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    fingerprint TEXT PRIMARY KEY, owner TEXT NOT NULL, public_key BLOB NOT NULL,
    added TEXT NOT NULL, revoked TEXT
);
CREATE TABLE IF NOT EXISTS policy (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO policy (name, value) VALUES ('require_signatures', '1');
"""


@dataclass(frozen=True)
class KeyInfo:
    fingerprint: str
    owner: str
    added: str
    revoked: str | None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class KeyRegistry(SqliteStore):
    """One registry file; open one per process and close it."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FlexMoEError(
                self.path, "key registry not found (`flexmoe keys register` makes one)"
            )
        self.db = open_sqlite(self.path, _SCHEMA, "the key registry")

    @property
    def require_signatures(self) -> bool:
        row = self.db.execute("SELECT value FROM policy WHERE name = 'require_signatures'")
        return row.fetchone()[0] == "1"

    def set_require_signatures(self, required: bool) -> None:
        value = "1" if required else "0"
        self.db.execute("UPDATE policy SET value = ? WHERE name = 'require_signatures'", (value,))

    def register(self, key: PublicKeyFile) -> KeyInfo:
        """Register ``key`` for its owner; a key already registered (or revoked) is refused."""
        known = self.get(key.fingerprint)
        if known is not None:
            state = f"revoked {known.revoked}" if known.revoked else "registered"
            raise FlexMoEError(
                key.fingerprint[:16], f"this key is already {state} for {known.owner!r}"
            )
        added = _now()
        try:
            self.db.execute(
                "INSERT INTO keys (fingerprint, owner, public_key, added) VALUES (?, ?, ?, ?)",
                (key.fingerprint, key.owner, key.raw, added),
            )
        except sqlite3.Error as e:
            raise FlexMoEError(self.path, f"cannot write the key registry ({e})") from e
        return KeyInfo(key.fingerprint, key.owner, added, None)

    def find(self, prefix: str) -> KeyInfo:
        """The one key whose fingerprint starts with ``prefix`` (at least 8 hex digits)."""
        prefix = prefix.strip().lower()
        if len(prefix) < 8 or any(c not in "0123456789abcdef" for c in prefix):
            raise FlexMoEError(prefix, "give at least 8 hex digits of the key's fingerprint")
        rows = [k for k in self.list() if k.fingerprint.startswith(prefix)]
        if len(rows) != 1:
            raise FlexMoEError(prefix, "no such key" if not rows else "matches several keys")
        return rows[0]

    def revoke(self, prefix: str) -> KeyInfo:
        """Revoke a key: every package it signed is refused from now on."""
        key = self.find(prefix)
        if key.revoked:
            raise FlexMoEError(prefix, f"already revoked on {key.revoked}")
        now = _now()
        self.db.execute("UPDATE keys SET revoked = ? WHERE fingerprint = ?", (now, key.fingerprint))
        return KeyInfo(key.fingerprint, key.owner, key.added, now)

    def get(self, fingerprint: str) -> KeyInfo | None:
        row = self.db.execute(
            "SELECT fingerprint, owner, added, revoked FROM keys WHERE fingerprint = ?",
            (fingerprint,),
        ).fetchone()
        return KeyInfo(*row) if row else None

    def list(self) -> list[KeyInfo]:
        rows = self.db.execute(
            "SELECT fingerprint, owner, added, revoked FROM keys ORDER BY added, fingerprint"
        )
        return [KeyInfo(*row) for row in rows]

    def check(self, package_dir: Path, owner: str, signature: Signature | None) -> Signer | None:
        """The package's signer as this registry knows it, its signature already verified
        against the manifest: refused when unsigned (if the policy requires signatures), signed
        by an unknown or revoked key, or by a key registered to another owner than the
        manifest's."""
        where = Path(package_dir) / SIGNATURE_FILE
        if signature is None:
            if self.require_signatures:
                raise FlexMoEError(
                    package_dir,
                    f"unsigned package; the key registry {self.path.name} requires "
                    "signatures (`flexmoe expert sign`)",
                )
            return None
        key = self.get(signature.fingerprint)
        if key is None:
            raise FlexMoEError(
                where,
                f"signed by key {signature.fingerprint[:16]}..., which is not in the key registry",
            )
        if key.revoked:
            raise FlexMoEError(
                where,
                f"signed by key {key.fingerprint[:16]}... of {key.owner!r}, revoked on "
                f"{key.revoked}",
            )
        if key.owner != owner:
            raise FlexMoEError(
                where, f"signed by {key.owner!r}'s key, but the manifest's owner is {owner!r}"
            )
        return Signer(key.fingerprint, key.owner)
