"""A training job around the loop: the output refused if it exists, a work directory beside it
for checkpoints (kept for ``--resume``, removed once the artifact is written), every process
joined, the trained state gathered, and the artifact written by one process while the others
wait. The anchor, expert and unrestricted trainers are configurations of it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from flexmoe.data.packing import TokenStream
from flexmoe.errors import FlexMoEError
from flexmoe.training.config import TrainConfig
from flexmoe.training.loop import (
    AuxLoss,
    DistInfo,
    TrainingMode,
    TrainResult,
    barrier,
    full_state,
    init_distributed,
    train,
)

ArtifactT = TypeVar("ArtifactT")


def refuse_existing(out: Path, overwrite: bool) -> Path:
    """``out``, unless it exists and ``overwrite`` was not asked."""
    if Path(out).exists() and not overwrite:
        raise FlexMoEError(out, "already exists; choose another --out or pass --force")
    return Path(out)


@dataclass(frozen=True)
class TrainingJob:
    """One run that writes one artifact at ``out``."""

    out: Path
    cfg: TrainConfig
    device: torch.device
    desc: str
    _: KW_ONLY  # how it runs, always by name
    resume: bool = False
    progress: bool = True
    log_dir: Path | None = None
    aux_loss: AuxLoss | None = None
    after_step: Callable[[nn.Module], None] | None = None
    mode: TrainingMode | None = None

    @property
    def work(self) -> Path:
        """Beside ``out``: the checkpoints (and whatever the trainer prepares there)."""
        return self.out.parent / f".{self.out.name}.work"

    def start(self) -> DistInfo:
        """Join the processes; a fresh work directory unless resuming."""
        info = init_distributed(self.device)
        if info.is_main:
            if self.work.exists() and not self.resume:
                shutil.rmtree(self.work)
            self.work.mkdir(parents=True, exist_ok=True)
        barrier(info)
        return info

    def run(
        self,
        info: DistInfo,
        model: nn.Module,
        train_stream: TokenStream,
        val_stream: TokenStream | None,
        *,
        write: Callable[[dict[str, torch.Tensor], TrainResult], ArtifactT],
        written: Callable[[], ArtifactT],
    ) -> tuple[ArtifactT, TrainResult]:
        """Train ``model`` (after :meth:`start`); then ``write(state, result)`` the artifact in
        the main process while the others wait and read it back with ``written()``."""
        result = train(
            model,
            train_stream=train_stream,
            val_stream=val_stream,
            cfg=self.cfg,
            device=self.device,
            checkpoint_dir=self.work / "checkpoint",
            resume=self.resume,
            progress=self.progress,
            desc=self.desc,
            log_dir=self.log_dir,
            aux_loss=self.aux_loss,
            after_step=self.after_step,
            mode=self.mode,
        )
        gathered = [full_state(model)]  # every process takes part when the model is sharded
        if not info.is_main:
            barrier(info)
            return written(), result
        artifact = write(gathered.pop(), result)  # ``write`` holds the only reference
        shutil.rmtree(self.work, ignore_errors=True)
        barrier(info)
        return artifact, result
