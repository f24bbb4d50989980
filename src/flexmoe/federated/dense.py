"""The federated baseline, the classic approach (``fedavg``): the anchor's dense model trained by
FedAvg on the owners' text plus the public share, through the same Flower code as the rounds.

Each round every owner trains every parameter of the current dense model for a few local steps
at home and sends the change; the coordinator adds the token-weighted average, or applies it
through a server optimiser (FedAdam: the merged model's trunk recipe, on the dense model). The
result is a plain OLMo-2 checkpoint with ``fedavg.json``: the rounds, who took part, and the
bytes each owner sent. Unlike the merged model it has no experts to opt out of.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from flexmoe.anchor import Anchor, load_anchor
from flexmoe.data.tokenizer import save_tokenizer
from flexmoe.errors import FlexMoEError
from flexmoe.federated.messages import Arrays, Config, Updates, encode_dense
from flexmoe.federated.owner import Kind, OwnerText, RoundTask, train_locally
from flexmoe.federated.server import ServerOptimizer
from flexmoe.io import atomic_directory, write_json
from flexmoe.merge.slots import FederatedRound
from flexmoe.model.checkpoint import save_model
from flexmoe.training.config import TrainConfig
from flexmoe.training.loop import TrainResult

RECORD_FILE = "fedavg.json"


class FedAvgRecord(BaseModel):
    """What ``fedavg.json`` says of the baseline: its anchor, its rounds, its local training."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = "fedavg"
    anchor_fingerprint: str
    rounds: list[FederatedRound]
    hyperparameters: dict[str, float | int | str | bool | None]


def dense_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trained tensor of a dense model, float32 on the CPU."""
    return {k: v.detach().float().cpu().clone() for k, v in model.named_parameters()}


def dense_update(
    anchor: Anchor,
    state: dict[str, torch.Tensor],
    task: RoundTask,
    text: OwnerText,
    *,
    device: torch.device,
    cache_dir: Path | None,
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """The change of every parameter of the dense model at ``state`` after the task's steps on
    the owner's text."""
    model = anchor.model
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.data = state[name].to(param.device).clone()
            param.requires_grad_(True)
    result = train_locally(model, anchor.tokenizer, task, text, device, cache_dir)
    after = dense_state(model)
    return {k: after[k] - state[k] for k in state}, result


@dataclass
class DenseCoordinator:
    """The dense model between FedAvg rounds."""

    anchor_dir: Path
    excluded: frozenset[str] = frozenset()
    first_round: int = 1
    server: ServerOptimizer = field(default_factory=ServerOptimizer)  # fedavg, lr 1: FedAvg
    local_sgd: bool = False  # owners step with plain SGD, not AdamW
    anchor: Anchor = field(init=False)
    state: dict[str, torch.Tensor] = field(init=False)
    moments: dict[str, torch.Tensor] = field(default_factory=dict)  # the server optimiser's
    steps: int = 0  # the server optimiser's steps so far
    rounds: list[FederatedRound] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.anchor = load_anchor(self.anchor_dir)
        self.state = dense_state(self.anchor.model)

    def task(self, kind: Kind, round: int, cfg: TrainConfig) -> RoundTask:
        if kind != "dense":
            raise FlexMoEError("--recipe", f"the fedavg baseline has no {kind} phase")
        return RoundTask(kind=kind, round=round, cfg=cfg, trunk_sgd=self.local_sgd)

    @property
    def model_path(self) -> Path:
        """The model each owner holds a copy of: the anchor."""
        return self.anchor_dir

    def message(self, task: RoundTask) -> tuple[list[np.ndarray], Config]:
        return encode_dense(self.state, task)

    def take_slots(self, round: int, packages: dict[str, Path]) -> None:
        raise FlexMoEError("--recipe", "the fedavg baseline has no slots")

    def take_updates(self, round: int, kind: Kind, updates: Updates) -> None:
        total = sum(tokens for _, tokens in updates.values())
        if not updates or total <= 0:
            raise FlexMoEError("fedavg", f"round {round}: no owner sent an update")
        keys = sorted(self.state)
        average = [np.zeros_like(self.state[k].numpy()) for k in keys]
        for name in sorted(updates):
            arrays, tokens = updates[name]
            for i, array in enumerate(arrays):
                average[i] += np.asarray(array, dtype=np.float32) * np.float32(tokens / total)
        self.take_average(round, kind, average, sorted(updates))

    def take_average(
        self, round: int, kind: Kind, average: Arrays, participants: list[str]
    ) -> None:
        keys = sorted(self.state)
        if len(average) != len(keys):
            raise FlexMoEError("fedavg", f"an update of {len(average)} tensors, not {len(keys)}")
        changes = {}
        for key, change in zip(keys, average, strict=True):
            delta = torch.from_numpy(np.asarray(change, dtype=np.float32))
            if delta.shape != self.state[key].shape or not torch.isfinite(delta).all():
                raise FlexMoEError("fedavg", f"round {round}: a bad update of {key}")
            changes[key] = delta
        self.steps += 1
        self.state, self.moments = self.server.step(self.state, changes, self.moments, self.steps)

    def log_round(self, entry: FederatedRound) -> None:
        self.rounds.append(entry)

    def write(self, out: Path, cfg: TrainConfig, *, overwrite: bool = False) -> Path:
        """The dense model at the current state, in the anchor's dtype, with its record."""
        model = self.anchor.model
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.data = self.state[name].clone()
        record = FedAvgRecord(
            anchor_fingerprint=self.anchor.manifest.fingerprint,
            rounds=self.rounds,
            hyperparameters={
                **cfg.to_dict(),
                "local_optimizer": "sgd" if self.local_sgd else "adamw",
                "server_optimizer": self.server.name.value,
                "server_lr": self.server.lr,
                "server_tau": self.server.tau,
            },
        )
        with atomic_directory(out, overwrite=overwrite) as tmp:
            save_model(model, tmp, dtype=self.anchor.dtype)
            save_tokenizer(self.anchor.tokenizer, tmp)
            write_json(tmp / RECORD_FILE, record.model_dump(mode="json"))
        return Path(out)
