"""The project's exceptions: each says, in one line, which file or field is at fault and how."""

from __future__ import annotations

import unicodedata
from pathlib import Path

MAX_LINE = 300  # an error line is cut to this many characters


def printable(text: str, limit: int | None = None) -> str:
    """``text`` safe for a terminal: every control or format character (ESC, BEL, newline,
    bidi overrides...) written as an escape such as ``\\x1b``, and cut to ``limit`` characters
    with a note of how many were left out."""
    out = "".join(
        c if not unicodedata.category(c).startswith("C") else c.encode("unicode_escape").decode()
        for c in text
    )
    if limit is not None and len(out) > limit:
        out = out[: max(0, limit - 20)] + f"... ({len(out) - limit + 20:,} more)"
    return out


class FlexMoEError(Exception):
    """A user-facing error: bad input, a broken artifact, an impossible request.

    The CLI prints ``str(error)`` on one line and exits with code 2. The line holds no control
    character (a hostile file name or field cannot drive the terminal) and at most ``MAX_LINE``
    characters.
    """

    def __init__(self, where: str | Path | None, fault: str) -> None:
        self.where = printable(str(where), MAX_LINE // 2) if where is not None else None
        self.fault = printable(" ".join(fault.split()), MAX_LINE)
        line = f"{self.where}: {self.fault}" if self.where else self.fault
        super().__init__(printable(line, MAX_LINE))


class TrainingInterrupted(FlexMoEError):
    """Training stopped on SIGINT/SIGTERM after writing a resumable checkpoint."""
