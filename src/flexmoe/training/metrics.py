"""Training metrics a person can watch while a run goes: TensorBoard event files.

``tensorboard --logdir DIR`` shows them; every record of the training history (loss, learning
rate, validation loss) becomes a scalar, with tokens per second beside them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flexmoe.errors import FlexMoEError


class MetricsLog:
    """Scalars of one run written under ``log_dir/<run>`` (nothing is written without a dir)."""

    def __init__(self, log_dir: Path | None, run: str) -> None:
        self._writer: Any = None
        if log_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # the package depends on tensorboard; a broken install
            raise FlexMoEError("--log-dir", f"needs the tensorboard package ({e})") from e
        try:
            self._writer = SummaryWriter(log_dir=str(Path(log_dir) / run))
        except OSError as e:
            raise FlexMoEError(log_dir, f"cannot write TensorBoard logs ({e.strerror})") from e

    def record(self, record: dict[str, float], tokens_per_second: float | None = None) -> None:
        """One history record (``step`` and its values) as scalars at that step."""
        if self._writer is None:
            return
        step = int(record["step"])
        for key, value in record.items():
            if key != "step":
                self._writer.add_scalar(
                    f"train/{key}" if key != "val_loss" else "val/loss", value, step
                )
        if tokens_per_second is not None:
            self._writer.add_scalar("train/tokens_per_second", tokens_per_second, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
