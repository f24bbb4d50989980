"""Training hyper-parameters: a typed dataclass that validates itself and round-trips to JSON."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from flexmoe.errors import FlexMoEError

MEMORY_FIELDS = frozenset({"activation_checkpointing", "fsdp"})


def _field(default: Any, help: str) -> Any:
    """A config field with the help text its command-line option shows."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """How to train; ``batch_size`` counts sequences per optimizer step over all processes."""

    steps: int = _field(300, "optimizer steps")
    batch_size: int = _field(16, "sequences per step, over all processes")
    grad_accum: int = _field(1, "micro-batches accumulated per step")
    seq_len: int = _field(128, "tokens per training sequence")
    lr: float = _field(2e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _field(0.1, "final learning rate as a share of the peak (cosine decay)")
    warmup_steps: int = _field(30, "steps of linear warm-up")
    weight_decay: float = _field(0.1, "AdamW weight decay of matrices")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.95, "AdamW beta2")
    grad_clip: float = _field(1.0, "clip the gradient norm to this (0: no clipping)")
    eval_every: int = _field(100, "validation loss every N steps (0: only at the end)")
    eval_batches: int = _field(8, "batches per validation")
    checkpoint_every: int = _field(100, "checkpoint every N steps (0: never)")
    seed: int = _field(0, "seed of initialisation and batch order")
    z_loss: float = _field(0.0, "router z-loss weight")
    # How to fit in memory; neither changes what is computed, so a run may resume with either.
    activation_checkpointing: bool = _field(
        False, "recompute each layer's activations in backward: less GPU memory, ~30% slower"
    )
    fsdp: bool = _field(
        False,
        "under torchrun: shard weights, gradients and optimiser state over the processes "
        "(FSDP2) instead of copying the model to each (DDP)",
    )

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches")
        for name in positive:
            if getattr(self, name) <= 0:
                raise FlexMoEError(f"--{name.replace('_', '-')}", "must be positive")
        if self.lr <= 0:
            raise FlexMoEError("--lr", f"must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.checkpoint_every < 0:
            raise FlexMoEError("--warmup-steps", "step counts must not be negative")
        if not 0 <= self.min_lr_ratio <= 1:
            raise FlexMoEError("--min-lr-ratio", "must be between 0 and 1")
        if self.batch_size % self.grad_accum:
            raise FlexMoEError(
                "--batch-size",
                f"{self.batch_size} is not divisible by --grad-accum {self.grad_accum}",
            )

    def check_world(self, world_size: int) -> None:
        """The global batch must split evenly over processes and accumulation steps."""
        if self.batch_size % (world_size * self.grad_accum):
            raise FlexMoEError(
                "--batch-size",
                f"{self.batch_size} does not split over {world_size} processes x "
                f"{self.grad_accum} accumulation steps",
            )

    def result_fields(self) -> dict[str, float | int | str | bool | None]:
        """The fields that decide what a run computes (every field but the memory settings)."""
        return {k: v for k, v in asdict(self).items() if k not in MEMORY_FIELDS}

    def to_dict(self) -> dict[str, float | int | str | bool | None]:
        """Every field as JSON has it (numbers and booleans)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise FlexMoEError("train config", f"unknown fields: {', '.join(sorted(unknown))}")
        return cls(**data)  # type: ignore[arg-type]  # __post_init__ checks the values


# Each command's defaults, defined here once: the command line shows them (--help) and the
# Python API takes them.
ANCHOR_TRAINING = TrainConfig()
EXPERT_TRAINING = TrainConfig(
    steps=200,
    lr=1e-3,
    warmup_steps=20,
    weight_decay=0.0,
    eval_every=50,
    checkpoint_every=50,
    z_loss=1e-3,
)
ROUTER_TUNING = TrainConfig(
    steps=100,
    lr=1e-3,
    warmup_steps=10,
    weight_decay=0.0,
    eval_every=50,
    checkpoint_every=0,
    z_loss=1e-3,
)
UNRESTRICTED_TRAINING = TrainConfig(
    steps=800,
    lr=1e-3,
    warmup_steps=20,
    weight_decay=0.0,
    eval_every=100,
    checkpoint_every=0,
    z_loss=1e-3,
)
UNRESTRICTED_LEAVE_OUT = frozenset({"checkpoint_every", *MEMORY_FIELDS})  # not its options
# Federated rounds: each owner's local training in a slot phase and in a router phase. Short
# phases: on the demo corpora (60-step experts) 3 rounds of 5 + 5 steps beat 1 of 15 + 15 and
# 2 of 8 + 7, and one long router phase hurt (docs/federated.md).
FEDERATED_SLOT = TrainConfig(
    steps=5,
    lr=1e-3,
    warmup_steps=1,
    weight_decay=0.0,
    eval_every=0,
    checkpoint_every=0,
    z_loss=1e-3,
)
# A router phase steps with plain SGD (classic FedAvg's local optimiser): on both corpus sets it
# beat AdamW (docs/federated.md); lr 0.5 was the best of 0.2, 0.5 and 1.5 on the demo set.
FEDERATED_ROUTER = replace(FEDERATED_SLOT, steps=5, lr=0.5)
# A trunk phase: each owner's local training of the parameters every owner shares (attention,
# norms, the public and rival experts) and the router rows: one plain SGD step per round (its
# update is the gradient), which the coordinator's FedAdam turns into an Adam step on the owners'
# pooled gradient. Measured against AdamW with a few local steps and against FedAvg on the
# coordinator on three corpus sets (docs/federated.md).
FEDERATED_TRUNK = replace(FEDERATED_SLOT, steps=1, lr=1.0, warmup_steps=0)
