"""The demo's federated stages: ``flexmoe:federated`` at the specialists' compute, and the
``fedavg`` baseline, both on Flower with every owner a client on this machine.

``flexmoe:federated``: each owner trains its expert alone for ``expert_steps`` (fewer than its
specialist's), the experts are merged, and ``rounds`` federated rounds of slot and router phases
follow, so that each owner's steps in all equal its specialist's. ``fedavg``: the anchor's dense
model trained by FedAvg with as many tokens per owner as its expert's training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from flexmoe.data.documents import DataSpec
from flexmoe.experiment.corpora import DemoDomain
from flexmoe.experiment.settings import DemoSettings
from flexmoe.federated.dense import RECORD_FILE
from flexmoe.federated.flower import RoundPlan
from flexmoe.federated.owner import OwnerText
from flexmoe.federated.privacy import UpdatePrivacy
from flexmoe.federated.run import fedavg, federate
from flexmoe.io import read_json
from flexmoe.merge.build import build_merged
from flexmoe.merge.plan import plan_merge


@dataclass(frozen=True)
class FederatedStages:
    models: dict[str, Path]  # registry name -> directory, for the evaluation
    record: dict[str, Any]  # for results.json and the report


def owner_texts(owners: tuple[DemoDomain, ...], specs: dict[str, DataSpec]) -> list[OwnerText]:
    """Each owner's own corpus, with the public corpus as its public share."""
    return [OwnerText(d.name, (specs[d.name],), (specs["public"],)) for d in owners]


def first_experts(settings: DemoSettings) -> DemoSettings:
    """The demo's settings with each owner's expert trained for the stage's ``expert_steps``
    alone (its warm-up scaled alike)."""
    fed = settings.federated
    first = replace(
        settings.expert,
        steps=fed.expert_steps,
        warmup_steps=max(
            1, settings.expert.warmup_steps * fed.expert_steps // settings.expert.steps
        ),
        eval_every=0,
        checkpoint_every=0,
    )
    return replace(settings, expert=first)


def announce(settings: DemoSettings, root: Path) -> str:
    """What the stage does, said as its experts start training."""
    fed = settings.federated
    return (
        f"[federated] each owner's expert trained for {fed.expert_steps} steps alone, then "
        f"{fed.rounds} rounds of {fed.slot.steps} slot and {fed.router.steps} router steps "
        f"(Flower, every owner a client) -> {root}"
    )


def federated_stages(
    out: Path,
    anchor_dir: Path,
    owners: tuple[DemoDomain, ...],
    specs: dict[str, DataSpec],
    settings: DemoSettings,
    packages: list[Path],
    device: torch.device,
    tokens: Path,
    log: Callable[[str], None],
    score: Callable[[Path], dict[str, float]],
    *,
    privacy: bool = False,
) -> FederatedStages:
    """Both stages into ``out/federated`` and ``out/fedavg``, from ``packages``: every owner's
    expert trained as the demo trains it, with :func:`first_experts`'s settings, into
    ``out/federated/experts``. ``score(model)`` is a model's bits per byte per domain on the
    report's held-out text (the rounds run one at a time, so that the model after each is
    scored; a round continues from the versions the last one wrote, numbered and seeded as in
    one run of all of them). With ``privacy``, what ``--dp-epsilon`` costs too
    (:func:`privacy_cost`)."""
    fed = settings.federated
    root = out / "federated"
    merged = root / "merged"
    build_merged(plan_merge(anchor_dir, packages, top_k=settings.top_k), merged, overwrite=True)
    texts = owner_texts(owners, specs)
    one = RoundPlan(1, ("slot", "router"), fed.slot, fed.router)
    model, curve = merged, []
    for number in range(1, fed.rounds + 1):  # one at a time, to score the model after each
        curve.append({"round": number - 1, "bpb": score(model)})
        result = federate(
            model,
            texts,
            one,
            root / f"round-{number}",
            device=device,
            cache_dir=tokens,
            overwrite=True,
            log=log,
            progress=False,
        )
        model = result.out
    cost = (
        privacy_cost(merged, texts, settings, root / "privacy", score, device, tokens, log)
        if privacy
        else []
    )
    fedavg_dir = out / "fedavg"
    log(
        f"[federated] the fedavg baseline: the anchor's dense model, {fed.fedavg_rounds} FedAvg "
        f"rounds of {fed.fedavg.steps} local steps per owner -> {fedavg_dir}"
    )
    dense = RoundPlan(fed.fedavg_rounds, ("dense",), fed.slot, fed.router, dense=fed.fedavg)
    fedavg(
        anchor_dir,
        texts,
        dense,
        fedavg_dir,
        device=device,
        cache_dir=tokens,
        overwrite=True,
        log=log,
    )
    per_round = [r.model_dump(mode="json") for r in result.record.rounds]
    dense_record = read_json(fedavg_dir / RECORD_FILE)
    record = {
        "expert_steps": fed.expert_steps,
        "rounds": fed.rounds,
        "slot_steps": fed.slot.steps,
        "router_steps": fed.router.steps,
        "owner_steps": fed.expert_steps + fed.rounds * (fed.slot.steps + fed.router.steps),
        "specialist_steps": settings.expert.steps,
        "per_round": per_round,
        "bpb_by_round": curve,  # the last round's model is scored as flexmoe:federated
        "privacy_cost": cost,
        "fedavg_rounds": fed.fedavg_rounds,
        "fedavg_steps": fed.fedavg.steps,
        "fedavg_per_round": dense_record["rounds"],
    }
    return FederatedStages({"flexmoe:federated": model, "fedavg": fedavg_dir}, record)


DP_EPSILONS = (8.0, 1000.0)  # the two values at which the report prices --dp-epsilon


def privacy_cost(
    merged: Path,
    texts: list[OwnerText],
    settings: DemoSettings,
    root: Path,
    score: Callable[[Path], dict[str, float]],
    device: torch.device,
    tokens: Path,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Router-only rounds on ``merged`` (the only phase ``--dp-epsilon`` takes), without noise and
    at each of :data:`DP_EPSILONS`; each model's bits per byte."""
    fed = settings.federated
    plain = RoundPlan(fed.rounds, ("router",), fed.slot, fed.router)
    rows = []
    for epsilon in (None, *DP_EPSILONS):
        plan = plain
        if epsilon is not None:
            budget = UpdatePrivacy.for_budget(epsilon, plain.releases(), clip=None)
            plan = replace(plain, privacy=budget)
        name = "no-noise" if epsilon is None else f"epsilon-{epsilon:g}"
        log(f"[federated] what --dp-epsilon costs: {fed.rounds} router rounds, {name}")
        result = federate(
            merged,
            texts,
            plan,
            root / name,
            device=device,
            cache_dir=tokens,
            overwrite=True,
            log=log,
            progress=False,
        )
        rows.append(
            {
                "epsilon": epsilon,
                "noise_multiplier": plan.privacy.noise_multiplier if plan.privacy else 0.0,
                "clip": plan.privacy.clip["router"] if plan.privacy else None,
                "spent": result.record.epsilon,
                "bpb": score(result.out),
            }
        )
    return rows
