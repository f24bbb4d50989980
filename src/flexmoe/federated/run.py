"""Federated rounds from start to finish: the inputs checked in one line each before any owner
is started, the rounds run, the new model written whole or not at all."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from pydantic import BaseModel, ConfigDict

from flexmoe.data.documents import DataSpec, expand_paths
from flexmoe.errors import FlexMoEError
from flexmoe.expert.identity import name_key
from flexmoe.federated.flower import RoundCoordinator, RoundPlan, simulate
from flexmoe.federated.owner import OwnerText
from flexmoe.federated.rounds import Coordinator
from flexmoe.federated.server import ServerOptimizer
from flexmoe.merge.layout import MergedModel
from flexmoe.merge.slots import FederatedRound, Federation
from flexmoe.merge.standing import standing_exclusions

if TYPE_CHECKING:
    from flexmoe.expert.registry import KeyRegistry


class Runner(Protocol):
    """What runs the rounds on a coordinator: Flower's simulation, or a deployment."""

    def __call__(
        self,
        coordinator: RoundCoordinator,
        texts: list[OwnerText],
        plan: RoundPlan,
        *,
        device: torch.device,
        cache_dir: Path | None,
        log: Callable[[str], None],
        debug: bool,
    ) -> None: ...


@dataclass(frozen=True)
class FederatedResult:
    out: Path
    record: Federation
    excluded: frozenset[str]

    def summary(self, rounds: int) -> RoundsSummary:
        return RoundsSummary.of(self.out, self.record, self.excluded, rounds)


class RoundsSummary(BaseModel):
    """What a run of rounds did, as `fed simulate` and `fed serve` report it (``--json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: str
    rounds: list[FederatedRound]  # this run's rounds
    router_version: int
    slot_versions: dict[str, int]
    excluded: list[str]  # experts whose owners had opted out
    epsilon: dict[str, float | None]  # each owner's, over every update it sent (DP)
    delta: float | None

    @classmethod
    def of(
        cls, out: Path | str, record: Federation, excluded: frozenset[str], rounds: int
    ) -> RoundsSummary:
        return cls(
            out=str(out),
            rounds=record.rounds[-rounds:],
            router_version=record.current_router,
            slot_versions=record.current_slots,
            excluded=sorted(excluded),
            epsilon=record.epsilon,
            delta=record.delta,
        )

    def owners(self) -> set[str]:
        """Every owner that took part in any phase of these rounds."""
        return {o for r in self.rounds for names in r.participants.values() for o in names}


def check_owners(
    merged: MergedModel, texts: list[OwnerText], excluded: frozenset[str]
) -> list[OwnerText]:
    """Every owner names an owner's expert of this model once, has not opted out, and its files
    (and the public share's) exist; returns them under their experts' names as the model
    spells them."""
    table = merged.table()
    known = {name_key(s.name): s.name for s in table.slots[1:]}
    if not texts:
        raise FlexMoEError("--data", "give at least one NAME=FILES")
    seen: set[str] = set()
    for text in texts:
        name = known.get(name_key(text.name))
        if name is None:
            listed = ", ".join(known.values())
            raise FlexMoEError(text.name, f"no such expert in this model (experts: {listed})")
        if name in seen:
            raise FlexMoEError(text.name, "given twice")
        if name in excluded:
            raise FlexMoEError(text.name, "has opted out of this model; it takes no part in rounds")
        seen.add(name)
        _check_files(text.data)
        _check_files(text.public)
        if text.key is not None and not Path(text.key).is_file():
            raise FlexMoEError(text.key, "signing key not found")
    return [replace(t, name=known[name_key(t.name)]) for t in texts]


def _check_files(specs: tuple[DataSpec, ...]) -> None:
    for spec in specs:
        for pattern in spec.paths:
            expand_paths(pattern)


def federate(
    model: Path,
    texts: list[OwnerText],
    plan: RoundPlan,
    out: Path,
    *,
    device: torch.device,
    cache_dir: Path | None,
    registry: KeyRegistry | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    debug: bool = False,
    runner: Runner = simulate,
    slot_row: bool = True,
    router_sgd: bool = True,
    after_round: Callable[[Coordinator], None] | None = None,
) -> FederatedResult:
    """``plan.rounds`` rounds of the owners in ``texts`` on the merged model at ``model``, every
    owner a Flower client on this machine (``runner``); the new model with every version goes
    to ``out``.

    Owners that opted out take no part and no token routes to their experts; the rounds start
    from the newest versions they never shaped. ``after_round`` sees the coordinator after each
    round (to score the model as it goes).
    """
    merged, out = check_rounds(model, plan, out, overwrite)
    excluded = standing_exclusions(merged.path)
    texts = check_owners(merged, texts, excluded)
    with new_model(
        merged, out, plan, registry, excluded, slot_row, router_sgd, progress
    ) as coordinator:
        coordinator.after_round = after_round
        runner(coordinator, texts, plan, device=device, cache_dir=cache_dir, log=log, debug=debug)
    return FederatedResult(out=out, record=coordinator.record, excluded=excluded)


def check_rounds(
    model: Path, plan: RoundPlan, out: Path, overwrite: bool
) -> tuple[MergedModel, Path]:
    """The merged model, and the new model's directory, checked before any round starts."""
    if any(p not in ("slot", "router", "trunk") for p in plan.phases):
        raise FlexMoEError("--recipe", f"phases must be slot, router or trunk, got {plan.phases}")
    merged = MergedModel.open(model)
    out = Path(out)
    if out.resolve() == merged.path.resolve():
        raise FlexMoEError(out, "write the new model to a new directory, not over the original")
    if out.exists() and not overwrite:
        raise FlexMoEError(out, "already exists; choose another --out or pass --force")
    return merged, out


@contextmanager
def new_model(
    merged: MergedModel,
    out: Path,
    plan: RoundPlan,
    registry: KeyRegistry | None,
    excluded: frozenset[str],
    slot_row: bool,
    router_sgd: bool,
    progress: bool,
) -> Iterator[Coordinator]:
    """A coordinator whose new versions go to a work directory beside ``out``; once the block
    has run its rounds, the new model is written to ``out`` (whole, or not at all)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=out.parent) as work:
        coordinator = Coordinator(
            merged,
            Path(work),
            registry,
            excluded,
            slot_row,
            router_sgd,
            server=plan.server,
            lora_rank=plan.lora_rank,
            trunk_sgd=plan.trunk_sgd,
            trunk_embeddings=plan.trunk_embeddings,
        )
        yield coordinator
        coordinator.write(out, progress=progress)


def fedavg(
    anchor: Path,
    texts: list[OwnerText],
    plan: RoundPlan,
    out: Path,
    *,
    device: torch.device,
    cache_dir: Path | None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    debug: bool = False,
    runner: Runner = simulate,
    server: ServerOptimizer | None = None,
    local_sgd: bool = False,
) -> Path:
    """The ``fedavg`` baseline: ``plan.rounds`` rounds of FedAvg on the anchor's dense model,
    each owner training every parameter on its own text at home (``plan.dense``); with
    ``server`` (FedAdam, say) and ``local_sgd``, the FedOpt recipe of the merged model's trunk
    on the whole dense model instead."""
    from flexmoe.federated.dense import DenseCoordinator

    out = Path(out)
    if plan.phases != ("dense",):
        raise FlexMoEError("fedavg", f"its rounds have one dense phase, not {plan.phases}")
    if out.exists() and not overwrite:
        raise FlexMoEError(out, "already exists; choose another --out or pass --force")
    if not texts:
        raise FlexMoEError("--data", "give at least one NAME=FILES")
    if len({name_key(t.name) for t in texts}) != len(texts):
        raise FlexMoEError("--data", "an owner is given twice")
    for text in texts:
        _check_files(text.data)
        _check_files(text.public)
    coordinator = DenseCoordinator(anchor, server=server or ServerOptimizer(), local_sgd=local_sgd)
    runner(coordinator, texts, plan, device=device, cache_dir=cache_dir, log=log, debug=debug)
    return coordinator.write(out, plan.cfg("dense"), overwrite=overwrite)
