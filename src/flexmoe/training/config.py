"""Training hyper-parameters: a typed dataclass that validates itself and round-trips to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from flexmoe.errors import FlexMoEError

MEMORY_FIELDS = frozenset({"activation_checkpointing", "fsdp"})


@dataclass(frozen=True)
class TrainConfig:
    """How to train; ``batch_size`` counts sequences per optimizer step over all processes."""

    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    seed: int = 0
    z_loss: float = 0.0
    # How to fit in memory; neither changes what is computed, so a run may resume with either.
    activation_checkpointing: bool = False  # recompute each layer's activations in backward
    fsdp: bool = False  # under torchrun: shard parameters, gradients, optimiser state (FSDP2)

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

    def result_fields(self) -> dict[str, Any]:
        """The fields that decide what a run computes (every field but the memory settings)."""
        return {k: v for k, v in asdict(self).items() if k not in MEMORY_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise FlexMoEError("train config", f"unknown fields: {', '.join(sorted(unknown))}")
        return cls(**data)
