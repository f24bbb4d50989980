"""The usage ledger: every completed response's per-expert attribution, appended durably.

SQLite in WAL mode beside the model (``flexmoe_ledger.sqlite``): one row per response (time,
endpoint, token counts) and one row per expert it used, with the tokens weighted by that expert's
share of the routing mass. Each response is one transaction with ``synchronous=FULL``, so a
response the server has answered is in the ledger even if the server is killed right after.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from flexmoe.errors import FlexMoEError
from flexmoe.io import SqliteStore
from flexmoe.merge.layout import MergedModel

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY, time TEXT NOT NULL, day TEXT NOT NULL, endpoint TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    response TEXT NOT NULL REFERENCES responses(id), expert TEXT NOT NULL,
    share REAL NOT NULL, tokens REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_expert ON usage (expert);
"""


@dataclass(frozen=True)
class UsageRow:
    key: str  # the day or the expert
    responses: int
    completion_tokens: float  # weighted by the expert's share when grouped by expert
    prompt_tokens: int


@dataclass(frozen=True)
class ExpertTotals:
    responses: int  # responses that used the expert
    responses_total: int  # all responses
    weighted_tokens: float  # completion tokens weighted by the expert's share
    mean_share: float


class Ledger(SqliteStore):
    """The ledger of one model directory. Open one per thread."""

    SCHEMA = _SCHEMA
    WHAT = "the usage ledger"

    def __init__(self, model_dir: Path, *, create: bool = True) -> None:
        self.path = MergedModel(Path(model_dir)).ledger_file
        if not create and not self.path.exists():
            raise FlexMoEError(self.path, "no ledger yet: the server has answered no request")
        self._open()

    def record(
        self,
        response_id: str,
        *,
        endpoint: str,
        prompt_tokens: int,
        completion_tokens: int,
        shares: dict[str, float],
    ) -> None:
        """Append one response and its per-expert shares in one transaction."""
        now = datetime.now(UTC)
        with self.transaction("append to the usage ledger") as db:
            db.execute(
                "INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                (
                    response_id,
                    now.isoformat(timespec="milliseconds"),
                    now.date().isoformat(),
                    endpoint,
                    prompt_tokens,
                    completion_tokens,
                ),
            )
            db.executemany(
                "INSERT INTO usage VALUES (?, ?, ?, ?)",
                [(response_id, e, s, s * completion_tokens) for e, s in shares.items() if s > 0],
            )

    def summary(self, by: str) -> list[UsageRow]:
        """Totals per ``day`` or per ``expert``."""
        if by == "day":
            query = (
                "SELECT day, COUNT(*), SUM(completion_tokens), SUM(prompt_tokens) "
                "FROM responses GROUP BY day ORDER BY day"
            )
        elif by == "expert":
            query = (
                "SELECT u.expert, COUNT(*), SUM(u.tokens), SUM(r.prompt_tokens) FROM usage u "
                "JOIN responses r ON r.id = u.response GROUP BY u.expert "
                "ORDER BY SUM(u.tokens) DESC"
            )
        else:
            raise FlexMoEError("--by", f"expected day or expert, got {by!r}")
        return [
            UsageRow(k, int(n), float(c or 0), int(p or 0))
            for k, n, c, p in self._current().execute(query)
        ]

    def expert_usage(self, expert: str) -> ExpertTotals:
        """One expert's totals: responses that used it, weighted tokens, mean share."""
        db = self._current()
        query = "SELECT COUNT(*), SUM(tokens), AVG(share) FROM usage WHERE expert = ?"
        n, tokens, share = db.execute(query, (expert,)).fetchone()
        total = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        return ExpertTotals(
            responses=int(n),
            responses_total=int(total),
            weighted_tokens=float(tokens or 0.0),
            mean_share=float(share or 0.0),
        )

    def expert_days(self, expert: str | None) -> list[UsageRow]:
        """Per day: the responses that used ``expert`` and their completion tokens weighted by
        its share (``None``: every response and all its completion tokens)."""
        if expert is None:
            return self.summary("day")
        query = (
            "SELECT r.day, COUNT(*), SUM(u.tokens), SUM(r.prompt_tokens) FROM usage u "
            "JOIN responses r ON r.id = u.response WHERE u.expert = ? GROUP BY r.day "
            "ORDER BY r.day"
        )
        return [
            UsageRow(k, int(n), float(c or 0), int(p or 0))
            for k, n, c, p in self._current().execute(query, (expert,))
        ]

    def latest(self, expert: str, count: int) -> list[tuple[str, str, int, float]]:
        """The last ``count`` responses: time, endpoint, completion tokens and ``expert``'s
        share of the routing mass (0 where it was not used), newest first."""
        query = (
            "SELECT r.time, r.endpoint, r.completion_tokens, COALESCE(u.share, 0) "
            "FROM responses r LEFT JOIN usage u ON u.response = r.id AND u.expert = ? "
            "ORDER BY r.time DESC, r.rowid DESC LIMIT ?"
        )
        return [
            (t, e, int(c), float(s))
            for t, e, c, s in self._current().execute(query, (expert, count))
        ]

    def rows(self) -> list[tuple[str, str, str, int, int, str, float, float]]:
        """Every response with each expert it used (one row per pair; a response that used
        none has one row with an empty expert), oldest first: the ledger as a table."""
        query = (
            "SELECT r.id, r.time, r.endpoint, r.prompt_tokens, r.completion_tokens, "
            "COALESCE(u.expert, ''), COALESCE(u.share, 0), COALESCE(u.tokens, 0) "
            "FROM responses r LEFT JOIN usage u ON u.response = r.id ORDER BY r.rowid, u.rowid"
        )
        return [
            (i, t, e, int(p), int(c), x, float(s), float(w))
            for i, t, e, p, c, x, s, w in self._current().execute(query)
        ]
