"""What each way of training together costs one owner, counted the same way for every method:
every token it trains on (its expert, its slot, router and trunk phases, its share of a joint
run), every byte it sends (its package, its updates; for the unrestricted bound, its text), what
the model costs per token at inference (FLOPs, in anchors) and whether it can opt out exactly
(the model afterwards equals one it never shaped).

The choice a consortium makes: ``flexmoe`` (no rounds, fully asynchronous), ``flexmoe:federated``
(rounds after the merge), ``fedavg`` (the dense anchor trained by FedAvg), ``btm`` (an ensemble of
the owners' own models) and ``unrestricted`` (all text pooled in one place).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flexmoe.merge.slots import FederatedRound


class OwnerCost(BaseModel):
    """One method, as one owner pays for it (the most any owner paid)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str  # its name in the evaluation
    owner_tokens: int
    bytes_sent: int
    inference: float | None  # FLOPs per token over the anchor's; None: not scored
    exact_opt_out: bool
    how: str  # what the owner does, in a few words


def package_bytes(package_dir: Path) -> int:
    """Every byte of an expert package (its tensors, manifest and signature)."""
    return sum(p.stat().st_size for p in Path(package_dir).iterdir() if p.is_file())


def round_totals(rounds: Iterable[FederatedRound]) -> tuple[int, int]:
    """The most tokens one owner trained on, and the most bytes one owner sent, over
    ``rounds``."""
    tokens: dict[str, int] = {}
    sent: dict[str, int] = {}
    for entry in rounds:
        for owner, count in entry.tokens.items():
            tokens[owner] = tokens.get(owner, 0) + count
        for owner, count in entry.bytes_sent.items():
            sent[owner] = sent.get(owner, 0) + count
    return max(tokens.values(), default=0), max(sent.values(), default=0)


def opt_out_said(cost: OwnerCost) -> str:
    return "yes" if cost.exact_opt_out else "no"


def accounting_table(costs: list[OwnerCost], scores: dict[str, float]) -> str:
    """A markdown table: each method's bits per byte (``scores``: model -> average), and what
    one owner pays for it."""
    lines = [
        "| model | average bpb | owner's tokens | owner sent | inference cost | exact opt-out "
        "| what an owner does |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for cost in costs:
        score = f"{scores[cost.model]:.4f}" if cost.model in scores else "not run"
        inference = f"{cost.inference:.2f}x" if cost.inference is not None else "-"
        lines.append(
            f"| {cost.model} | {score} | {cost.owner_tokens:,} | {_bytes(cost.bytes_sent)} "
            f"| {inference} | {opt_out_said(cost)} | {cost.how} |"
        )
    return "\n".join(lines)


def _bytes(count: int) -> str:
    return f"{count / 1e6:.2f} MB" if count >= 10_000 else f"{count:,} B"
