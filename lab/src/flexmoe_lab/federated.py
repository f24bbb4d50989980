"""The demo's federated stages: ``flexmoe:federated`` at the specialists' compute, and the
``fedavg`` baseline, both on Flower with every owner a client on this machine.

``flexmoe:federated``: each owner trains its expert alone for ``expert_steps`` (fewer than its
specialist's) against the coordinator's rivals, the experts are merged as the default merge is
(the rivals kept), and ``rounds`` federated rounds follow (the stage's recipe: by default trunk
phases, each owner one SGD step per round on the shared trunk and the router rows, FedAdam on the
coordinator), so that each owner's steps in all equal its specialist's. The model is scored on a
part of the held-out text every few rounds (the curve). ``fedavg``: the anchor's dense model
trained by FedAvg with as many tokens per owner as its expert's training.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from flexmoe.data.documents import DataSpec
from flexmoe.evaluate.accounting import OwnerCost, package_bytes, round_totals
from flexmoe.evaluate.registry import BTM, FEDAVG, FEDERATED, FLEXMOE, Evaluation
from flexmoe.expert.manifest import read_manifest
from flexmoe.federated.dense import RECORD_FILE
from flexmoe.federated.flower import RoundPlan
from flexmoe.federated.owner import OwnerText
from flexmoe.federated.privacy import UpdatePrivacy
from flexmoe.federated.rounds import Coordinator
from flexmoe.federated.run import fedavg, federate
from flexmoe.io import read_json
from flexmoe.merge.build import build_merged
from flexmoe.merge.plan import plan_merge
from flexmoe_lab.corpora import DemoDomain
from flexmoe_lab.results import CurvePoint, FederatedRecord, PrivacyCost
from flexmoe_lab.settings import DemoSettings, FederatedSettings

Score = Callable[[Path, int | None], dict[str, float]]  # a model, bytes per domain -> bpb


@dataclass(frozen=True)
class FederatedStages:
    models: dict[str, Path]  # registry name -> directory, for the evaluation
    record: FederatedRecord  # for results.json and the report


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


def round_plan(fed: FederatedSettings) -> RoundPlan:
    """The stage's rounds, as ``flexmoe fed simulate`` takes them."""
    return RoundPlan(
        rounds=fed.rounds,
        phases=fed.phases,  # type: ignore[arg-type]
        slot=fed.slot,
        router=fed.router,
        trunk=fed.trunk,
        server=fed.server,
        trunk_sgd=fed.trunk_sgd,
        trunk_embeddings=fed.trunk_embeddings,
    )


def announce(settings: DemoSettings, root: Path) -> str:
    """What the stage does, said as its experts start training."""
    fed = settings.federated
    steps = ", ".join(f"{p} {fed.steps(p)}" for p in fed.phases)
    return (
        f"[federated] each owner's expert trained for {fed.expert_steps} steps alone, then "
        f"{fed.rounds} rounds (steps per owner: {steps}; Flower, every owner a client; "
        f"{fed.server.name} on the coordinator) -> {root}"
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
    score: Score,
    *,
    privacy: bool = False,
) -> FederatedStages:
    """Both stages into ``out/federated`` and ``out/fedavg``, from ``packages`` (the coordinator's
    rivals, then every owner's expert trained with :func:`first_experts`'s settings).
    ``score(model, max_bytes)`` is a model's bits per byte per domain on the report's held-out
    text. With ``privacy``, what ``--dp-owner-epsilon`` costs too (:func:`privacy_cost`)."""
    fed = settings.federated
    root = out / "federated"
    merged = root / "merged"
    build_merged(plan_merge(anchor_dir, packages, top_k=settings.top_k), merged, overwrite=True)
    texts = owner_texts(owners, specs)
    curve = [CurvePoint(round=0, bpb=score(merged, fed.curve_bytes))]

    def scored(coordinator: Coordinator) -> None:
        number = len(coordinator.record.rounds)
        if number % fed.curve_every == 0 and number < fed.rounds:
            curve.append(CurvePoint(round=number, bpb=_score_state(coordinator, fed, score)))

    result = federate(
        merged,
        texts,
        round_plan(fed),
        root / "model",
        device=device,
        cache_dir=tokens,
        overwrite=True,
        log=log,
        progress=False,
        after_round=scored,
    )
    curve.append(CurvePoint(round=fed.rounds, bpb=score(result.out, fed.curve_bytes)))
    cost = []
    if privacy:
        cost = privacy_cost(merged, texts, settings, root / "privacy", score, device, tokens, log)
    fedavg_dir = _fedavg_stage(out, anchor_dir, texts, fed, device, tokens, log)
    record = FederatedRecord(
        expert_steps=fed.expert_steps,
        rounds=fed.rounds,
        phases=list(fed.phases),
        phase_steps={p: fed.steps(p) for p in fed.phases},
        server=fed.server.to_dict(),
        trunk_embeddings=fed.trunk_embeddings,
        owner_steps=fed.owner_steps,
        specialist_steps=settings.expert.steps,
        per_round=list(result.record.rounds),
        bpb_by_round=curve,
        curve_every=fed.curve_every,
        curve_bytes=fed.curve_bytes,
        privacy_cost=cost,
        fedavg_rounds=fed.fedavg_rounds,
        fedavg_steps=fed.fedavg.steps,
        fedavg_per_round=read_json(fedavg_dir / RECORD_FILE)["rounds"],
    )
    return FederatedStages({"flexmoe:federated": result.out, "fedavg": fedavg_dir}, record)


def _score_state(
    coordinator: Coordinator, fed: FederatedSettings, score: Score
) -> dict[str, float]:
    """The model the coordinator holds after a round, written aside and scored."""
    with tempfile.TemporaryDirectory(prefix=".curve-", dir=coordinator.work.parent) as where:
        model = coordinator.write(Path(where) / "model", progress=False).path
        return score(model, fed.curve_bytes)


def _fedavg_stage(
    out: Path,
    anchor_dir: Path,
    texts: list[OwnerText],
    fed: FederatedSettings,
    device: torch.device,
    tokens: Path,
    log: Callable[[str], None],
) -> Path:
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
    return fedavg_dir


DP_EPSILONS = (8.0, 1000.0)  # the two values at which the report prices --dp-owner-epsilon


def privacy_cost(
    merged: Path,
    texts: list[OwnerText],
    settings: DemoSettings,
    root: Path,
    score: Score,
    device: torch.device,
    tokens: Path,
    log: Callable[[str], None],
) -> list[PrivacyCost]:
    """The stage's rounds on ``merged`` without noise and at each of :data:`DP_EPSILONS`
    (every router and trunk update clipped and noised at home); each model's bits per byte."""
    plain = round_plan(settings.federated)
    rows = []
    for epsilon in (None, *DP_EPSILONS):
        plan = plain
        if epsilon is not None:
            budget = UpdatePrivacy.for_budget(epsilon, plain.releases(), clip=None)
            plan = replace(plain, privacy=budget)
        name = "no-noise" if epsilon is None else f"epsilon-{epsilon:g}"
        log(f"[federated] what --dp-owner-epsilon costs: {plain.rounds} rounds, {name}")
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
            PrivacyCost(
                epsilon=epsilon,
                noise_multiplier=plan.privacy.noise_multiplier if plan.privacy else 0.0,
                clip=dict(plan.privacy.clip) if plan.privacy else None,
                spent=result.record.epsilon,
                bpb=score(result.out, None),
            )
        )
    return rows


def owner_costs(
    out: Path,
    package_dirs: list[Path],
    record: FederatedRecord,
    evaluation: Evaluation,
) -> list[OwnerCost]:
    """What one owner paid for each of the consortium's choices in this run (the most any owner
    paid): its tokens, its bytes sent, the model's cost per token and whether it can leave
    exactly."""
    expert_tokens = max(read_manifest(p).training.tokens for p in package_dirs)
    expert_bytes = max(package_bytes(p) for p in package_dirs)
    first = [out / "federated" / "experts" / p.name for p in package_dirs]
    first_tokens = max(read_manifest(p).training.tokens for p in first)
    first_bytes = max(package_bytes(p) for p in first)
    round_tokens, round_bytes = round_totals(record.per_round)
    dense_tokens, dense_bytes = round_totals(record.fedavg_per_round)
    steps = ", ".join(f"{n} {p}" for p, n in record.phase_steps.items())
    rows = [
        (FLEXMOE, expert_tokens, expert_bytes, True, "trains its expert alone, once; sends it"),
        (
            FEDERATED,
            first_tokens + round_tokens,
            first_bytes + round_bytes,
            True,
            f"trains its expert ({record.expert_steps} steps), then {record.rounds} rounds "
            f"of {steps} step(s) at home; sends the expert and every update",
        ),
        (FEDAVG, dense_tokens, dense_bytes, False, "trains the whole dense model in rounds"),
        (BTM, expert_tokens, expert_bytes, True, "as flexmoe; every owner's model runs"),
    ]
    return [
        OwnerCost(
            model=name,
            owner_tokens=tokens,
            bytes_sent=sent,
            inference=evaluation.cost.get(name),
            exact_opt_out=exact,
            how=how,
        )
        for name, tokens, sent, exact, how in rows
        if name in evaluation.models
    ]
