"""The project's exceptions: each says, in one line, which file or field is at fault and how."""

from __future__ import annotations

from pathlib import Path


class FlexMoEError(Exception):
    """A user-facing error: bad input, a broken artifact, an impossible request.

    The CLI prints ``str(error)`` on one line and exits with code 2.
    """

    def __init__(self, where: str | Path | None, fault: str) -> None:
        self.where = str(where) if where is not None else None
        self.fault = " ".join(fault.split())
        super().__init__(f"{self.where}: {self.fault}" if self.where else self.fault)


class TrainingInterrupted(FlexMoEError):
    """Training stopped on SIGINT/SIGTERM after writing a resumable checkpoint."""
