"""The owners' standing choice: opted out or in, stored durably beside the merged model.

SQLite in WAL mode: a ``status`` table (one row per expert that ever changed) and an append-only
``audit`` table. Each change is one transaction, so a ``kill -9`` at any moment leaves the
previous state or the new one. Every load of the model (generation, evaluation, the server) reads
the current exclusions from here.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from flexmoe.errors import FlexMoEError
from flexmoe.inference.selection import SlotInfo, read_slots

DB_FILE = "flexmoe_standing.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS status (
    name TEXT PRIMARY KEY, opted_out INTEGER NOT NULL, reason TEXT NOT NULL, updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, name TEXT NOT NULL,
    action TEXT NOT NULL, reason TEXT NOT NULL, actor TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_append_only_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_append_only_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


@dataclass(frozen=True)
class ExpertStatus:
    slot: SlotInfo
    opted_out: bool
    reason: str
    updated: str | None


class StandingStore:
    """Opt-out state of one merged model's experts."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self.slots = read_slots(self.model_dir)
        self.path = self.model_dir / DB_FILE
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise FlexMoEError(self.path, f"cannot open the opt-out store ({e})") from e

    def close(self) -> None:
        self.db.close()

    def _slot(self, name: str) -> SlotInfo:
        slot = next((s for s in self.slots if s.name == name), None)
        if slot is None:
            known = ", ".join(s.name for s in self.slots[1:])
            raise FlexMoEError(name, f"no such expert in this model (experts: {known})")
        if slot.index == 0:
            raise FlexMoEError(name, "the public expert is always active")
        return slot

    def set(self, name: str, *, opted_out: bool, reason: str = "", actor: str = "cli") -> None:
        """Record a change and its audit row in one transaction."""
        self._slot(name)
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        action = "opt-out" if opted_out else "opt-in"
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT INTO status (name, opted_out, reason, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET opted_out=excluded.opted_out, "
                "reason=excluded.reason, updated=excluded.updated",
                (name, int(opted_out), reason, now),
            )
            self.db.execute(
                "INSERT INTO audit (time, name, action, reason, actor) VALUES (?, ?, ?, ?, ?)",
                (now, name, action, reason, actor),
            )
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            self.db.execute("ROLLBACK")
            raise FlexMoEError(self.path, f"could not record the {action} ({e})") from e

    def opted_out(self) -> frozenset[str]:
        rows = self.db.execute("SELECT name FROM status WHERE opted_out = 1").fetchall()
        return frozenset(r[0] for r in rows)

    def statuses(self) -> list[ExpertStatus]:
        rows = {
            r[0]: r for r in self.db.execute("SELECT name, opted_out, reason, updated FROM status")
        }
        out = []
        for slot in self.slots:
            row = rows.get(slot.name)
            out.append(
                ExpertStatus(
                    slot, bool(row and row[1]), row[2] if row else "", row[3] if row else None
                )
            )
        return out

    def audit(self) -> list[tuple[str, str, str, str, str]]:
        return list(
            self.db.execute("SELECT time, name, action, reason, actor FROM audit ORDER BY id")
        )


def standing_exclusions(model_dir: Path) -> frozenset[str]:
    """Names of the experts whose owners have opted out, as of now."""
    store = StandingStore(model_dir)
    try:
        return store.opted_out()
    finally:
        store.close()
