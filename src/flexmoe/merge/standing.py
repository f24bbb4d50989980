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
from flexmoe.io import SqliteStore
from flexmoe.merge.layout import MergedModel
from flexmoe.merge.slots import SlotInfo

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


class StandingStore(SqliteStore):
    """Opt-out state of one merged model's experts."""

    SCHEMA = _SCHEMA
    WHAT = "the opt-out store"

    def __init__(self, model_dir: Path) -> None:
        self.model = MergedModel.open(model_dir)
        self.path = self.model.standing_file
        self.slots = self.model.slots()
        self._open()

    def _reopened(self) -> None:
        self.slots = self.model.slots()

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
        with self.transaction(f"record the {action}") as db:
            self._slot(name)  # again: the model may have changed while we waited
            db.execute(
                "INSERT INTO status (name, opted_out, reason, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET opted_out=excluded.opted_out, "
                "reason=excluded.reason, updated=excluded.updated",
                (name, int(opted_out), reason, now),
            )
            db.execute(
                "INSERT INTO audit (time, name, action, reason, actor) VALUES (?, ?, ?, ?, ?)",
                (now, name, action, reason, actor),
            )

    def opted_out(self) -> frozenset[str]:
        """Experts of this model whose owners have opted out (rows of removed experts stay in
        the log but name no slot)."""
        rows = self._current().execute("SELECT name FROM status WHERE opted_out = 1").fetchall()
        return frozenset(r[0] for r in rows) & {s.name for s in self.slots}

    def statuses(self) -> list[ExpertStatus]:
        rows = {
            r[0]: r
            for r in self._current().execute("SELECT name, opted_out, reason, updated FROM status")
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
            self._current().execute(
                "SELECT time, name, action, reason, actor FROM audit ORDER BY id"
            )
        )


def standing_exclusions(model_dir: Path, slots: list[SlotInfo] | None = None) -> frozenset[str]:
    """Names of the experts whose owners have opted out, as of now.

    A quick read-only query (no schema set-up): every request makes it.
    """
    model = MergedModel(Path(model_dir))
    path = model.standing_file
    names = {s.name for s in (slots if slots is not None else model.slots())}
    if not path.exists():
        return frozenset()
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            rows = db.execute("SELECT name FROM status WHERE opted_out = 1").fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        raise FlexMoEError(path, f"cannot read the opt-out store ({e})") from e
    return frozenset(r[0] for r in rows) & names
