"""Federated recipes measured on a finished demo run: one JSON line per recipe.

Each recipe is ``E:R:S:T[:K]``: every owner's expert first trained for E steps alone (as the demo
trains it, against the run's anchor and its public rival experts), merged as the demo merges
(the rivals kept), then R federated rounds (``flexmoe fed simulate``, every owner a Flower
client) of S slot steps, T router steps and K trunk steps per owner. An owner's compute is
E + R (S + T + K) steps of the demo's batch (every step the same tokens, the public share
included); btm's specialists trained for the demo's expert steps. Every model is scored on the
same held-out text as the report (bits per byte per domain, the public domain included); the
first line of each expert-step count is its untuned merge.

Usage (after ``flexmoe-lab demo --out RUN [--corpora NAME]``):

    python lab/experiments/federated_recipes.py RUN --corpora demo --recipes 10:50:0:0:1 \\
        [--trunk-embeddings none|output|all] [--lora-rank 8] [--btm] [--fedavg] [--fedadam-dense]

The defaults are ``fed simulate``'s (trunk phases of one SGD step at lr 1, FedAdam at lr 0.003
and tau 1e-8 on the coordinator, the output layer in the trunk).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from flexmoe.anchor import load_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.evaluate.baselines import build_baseline
from flexmoe.evaluate.perplexity import evaluate_loaded
from flexmoe.expert.package import load_package
from flexmoe.expert.rivals import shipped_rivals
from flexmoe.federated.flower import RoundPlan
from flexmoe.federated.owner import OwnerText
from flexmoe.federated.privacy import UpdatePrivacy
from flexmoe.federated.run import fedavg, federate
from flexmoe.federated.server import FEDERATED_SERVER, ServerOptimizer
from flexmoe.inference.selection import load_selected
from flexmoe.merge.build import build_merged
from flexmoe.merge.plan import plan_merge
from flexmoe.training.config import (
    FEDERATED_ROUTER,
    FEDERATED_SLOT,
    FEDERATED_TRUNK,
    TrainConfig,
)
from flexmoe_lab.corpora import corpora_dir, corpus_set
from flexmoe_lab.pipeline import FULL, _train_experts

CPU = torch.device("cpu")


def merged_at(run: Path, steps: int, corpora: dict[str, Path], names: object, tokens: Path) -> Path:
    """The run's own merged model when ``steps`` is the demo's, else experts trained for
    ``steps`` (against the anchor's rivals) and merged with the rivals (kept under
    ``run/federated-recipes``)."""
    if steps == FULL.expert.steps:
        return run / "merged"
    root = run / "federated-recipes" / f"experts-{steps}"
    if (root / "merged").is_dir():
        return root / "merged"
    warmup = max(1, FULL.expert.warmup_steps * steps // FULL.expert.steps)
    expert = replace(
        FULL.expert, steps=steps, warmup_steps=warmup, eval_every=0, checkpoint_every=0
    )
    settings = replace(FULL, expert=expert)
    packages = _train_experts(
        root / "experts",
        f"[{steps} steps]",
        names,  # type: ignore[arg-type]
        run / "anchor",
        corpora,
        settings,
        CPU,
        tokens,
        print,
    )
    rivals = shipped_rivals(run / "anchor")
    plan = plan_merge(run / "anchor", [*rivals, *packages], top_k=FULL.top_k)
    build_merged(plan, root / "merged", progress=False)
    return root / "merged"


def score(model: Path, specs: list[DataSpec], tokens: Path) -> dict[str, float]:
    """Bits per byte on the report's held-out text (its first ``eval_bytes`` per domain)."""
    scores = evaluate_loaded(
        load_selected(model),
        load_tokenizer(model),
        specs,
        device=CPU,
        cache_dir=tokens,
        max_bytes=FULL.eval_bytes,
    )
    return {s.domain: round(s.bits_per_byte, 4) for s in scores}


def emit(recipe: str, owner_steps: float, bpb: dict[str, float], **extra: object) -> None:
    average = round(sum(bpb.values()) / len(bpb), 4)
    line = {"recipe": recipe, "owner_steps": owner_steps, "bpb": bpb, "average": average}
    print(json.dumps(line | extra), flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished demo output directory")
    parser.add_argument("--corpora", default="demo")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "flexmoe")
    parser.add_argument("--recipes", default="30:6:0:0:5")
    parser.add_argument("--slot-lr", type=float, default=FEDERATED_SLOT.lr)
    parser.add_argument("--router-lr", type=float, default=FEDERATED_ROUTER.lr)
    parser.add_argument("--trunk-lr", type=float, default=FEDERATED_TRUNK.lr)
    parser.add_argument("--server-optimizer", default=FEDERATED_SERVER.name.value)
    parser.add_argument("--server-lr", type=float, default=FEDERATED_SERVER.lr)
    parser.add_argument("--server-tau", type=float, default=FEDERATED_SERVER.tau)
    parser.add_argument("--server-decay", action="store_true", help="cosine over the rounds")
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument(
        "--trunk-adamw", action="store_true", help="trunk phases step with AdamW, not SGD"
    )
    parser.add_argument(
        "--trunk-batch", type=int, default=None, help="sequences per trunk step (default: 16)"
    )
    parser.add_argument("--server-beta2", type=float, default=0.99)
    parser.add_argument("--trunk-embeddings", default="output", help="none, output or all")
    parser.add_argument("--secagg", action="store_true", help="averages under SecAgg+")
    parser.add_argument("--btm", action="store_true", help="also score btm (the run's experts)")
    parser.add_argument("--fedavg", action="store_true", help="also train and score fedavg")
    parser.add_argument(
        "--fedadam-dense",
        action="store_true",
        help="also the dense anchor with the trunk's recipe (--trunk-lr, --server-*)",
    )
    parser.add_argument("--router-adamw", action="store_true", help="router phases with AdamW")
    parser.add_argument(
        "--dp-owner-epsilon",
        type=float,
        default=None,
        help="update-level differential privacy: every owner's epsilon over all its updates",
    )
    return parser


def plan_of(recipe: str, args: argparse.Namespace) -> tuple[float, RoundPlan | None]:
    """A recipe's owner compute, in steps of the demo's batch, and its rounds (None: none)."""
    e, r, s, t, k = ([int(x) for x in recipe.split(":")] + [0])[:5]
    if r == 0:
        return e, None
    size = {"batch_size": FULL.expert.batch_size, "seq_len": FULL.expert.seq_len}

    def local(cfg: TrainConfig, steps: int, lr: float) -> TrainConfig:
        warmup = max(1, steps // 10)
        return replace(cfg, steps=max(steps, 1), lr=lr, warmup_steps=warmup, **size)  # type: ignore[arg-type]

    phases = tuple(p for p, n in (("slot", s), ("router", t), ("trunk", k)) if n)
    plan = RoundPlan(
        rounds=r,
        phases=phases,  # type: ignore[arg-type]
        slot=local(FEDERATED_SLOT, s, args.slot_lr),  # type: ignore[arg-type]
        router=local(FEDERATED_ROUTER, t, args.router_lr),
        trunk=replace(
            local(FEDERATED_TRUNK, k, args.trunk_lr),  # type: ignore[arg-type]
            batch_size=args.trunk_batch or FULL.expert.batch_size,
        ),
        server=ServerOptimizer.from_dict(
            {
                "name": args.server_optimizer,
                "lr": args.server_lr,
                "tau": args.server_tau,
                "beta2": args.server_beta2,
                "decay_steps": r if args.server_decay else 0,
            }
        ),
        lora_rank=args.lora_rank,
        trunk_sgd=not args.trunk_adamw,
        trunk_embeddings=args.trunk_embeddings,
        secagg=args.secagg,
    )
    if args.dp_owner_epsilon is not None:
        privacy = UpdatePrivacy.for_budget(args.dp_owner_epsilon, plan.releases(), clip=None)
        plan = replace(plan, privacy=privacy)
    trunk_steps = k * plan.trunk.batch_size / FULL.expert.batch_size  # in full-batch steps
    return round(e + r * (s + t + trunk_steps), 2), plan


def label(recipe: str, args: argparse.Namespace) -> str:
    said = [recipe]
    if ":" in recipe and len(recipe.split(":")) == 5 and recipe.split(":")[4] != "0":
        local = "AdamW" if args.trunk_adamw else "SGD"
        said.append(
            f"trunk {local} lr {args.trunk_lr:g}, server {args.server_optimizer} lr "
            f"{args.server_lr:g} tau {args.server_tau:g}" + (" cosine" if args.server_decay else "")
        )
        if args.lora_rank:
            said.append(f"lora rank {args.lora_rank}")
        if args.trunk_batch:
            said.append(f"trunk batch {args.trunk_batch}")
        if args.trunk_embeddings != "none":
            said.append(f"vocabulary tensors in the trunk: {args.trunk_embeddings}")
        if args.server_beta2 != 0.99:
            said.append(f"server beta2 {args.server_beta2:g}")
    if args.router_adamw:
        said.append("router AdamW")
    if args.secagg:
        said.append("SecAgg+")
    if args.dp_owner_epsilon is not None:
        said.append(f"dp epsilon {args.dp_owner_epsilon:g}")
    return "; ".join(said)


def dense_row(
    args: argparse.Namespace,
    texts: list[OwnerText],
    specs: list[DataSpec],
    tokens: Path,
    *,
    fedopt: bool,
) -> None:
    """The dense anchor trained by the owners with as many steps each as an expert's training:
    the demo's FedAvg (local AdamW, few rounds), or with ``fedopt`` the trunk's recipe (one SGD
    step per owner per round, the server optimiser of ``args``)."""
    fed = FULL.federated
    if fedopt:
        local = replace(fed.trunk, steps=1, lr=args.trunk_lr)
        dense = RoundPlan(FULL.expert.steps, ("dense",), fed.slot, fed.router, dense=local)
        server = ServerOptimizer.from_dict(
            {"name": args.server_optimizer, "lr": args.server_lr, "tau": args.server_tau}
        )
        name = (
            f"dense, SGD lr {args.trunk_lr:g}, server {args.server_optimizer} lr {args.server_lr:g}"
        )
    else:
        dense = RoundPlan(fed.fedavg_rounds, ("dense",), fed.slot, fed.router, dense=fed.fedavg)
        server, name = ServerOptimizer(), "fedavg"
    out = args.run / "federated-recipes" / name.replace(" ", "-").replace(",", "")
    started = time.perf_counter()
    fedavg(
        args.run / "anchor",
        texts,
        dense,
        out,
        device=CPU,
        cache_dir=tokens,
        overwrite=True,
        server=server,
        local_sgd=fedopt,
    )
    steps = dense.rounds * dense.cfg("dense").steps
    emit(name, steps, score(out, specs, tokens), seconds=round(time.perf_counter() - started, 1))


def main() -> None:
    args = _parser().parse_args()
    corpora = corpus_set(args.corpora)
    folder = corpora_dir(args.cache_dir, corpora)
    files = {d.name: folder / f"{d.name}.jsonl" for d in corpora.domains}
    specs = [DataSpec(n, (str(p),), id_field="id") for n, p in files.items()]
    tokens = args.cache_dir / "tokens"
    owners = corpora.domains[1:]
    texts = [
        OwnerText(d.name, (DataSpec(d.name, (str(files[d.name]),), id_field="id"),), (specs[0],))
        for d in owners
    ]
    if args.btm:
        anchor = load_anchor(args.run / "anchor")
        packages = [load_package(args.run / "experts" / d.name, anchor) for d in owners]
        btm = build_baseline("btm", anchor=anchor, packages=packages, device=CPU)
        scores = evaluate_loaded(
            btm, anchor.tokenizer, specs, device=CPU, cache_dir=tokens, max_bytes=FULL.eval_bytes
        )
        emit("btm", FULL.expert.steps, {s.domain: round(s.bits_per_byte, 4) for s in scores})
    if args.fedavg:
        dense_row(args, texts, specs, tokens, fedopt=False)
    if args.fedadam_dense:
        dense_row(args, texts, specs, tokens, fedopt=True)
    scored: set[int] = set()
    for recipe in filter(None, args.recipes.split(",")):
        owner_steps, plan = plan_of(recipe, args)
        e = int(recipe.split(":")[0])
        merged = merged_at(args.run, e, files, owners, tokens)
        if e not in scored:
            scored.add(e)
            emit(f"{e}:0:0:0", e, score(merged, specs, tokens))
        if plan is None:
            continue
        name = label(recipe, args).replace(":", "-").replace("; ", "_").replace(" ", "-")
        out = args.run / "federated-recipes" / name
        started = time.perf_counter()
        result = federate(
            merged,
            texts,
            plan,
            out,
            device=CPU,
            cache_dir=tokens,
            overwrite=True,
            progress=False,
            router_sgd=not args.router_adamw,
        )
        rounds = result.record.rounds[-plan.rounds :]
        sent = {n: sum(r.bytes_sent.get(n, 0) for r in rounds) for n in rounds[0].bytes_sent}
        emit(
            label(recipe, args),
            owner_steps,
            score(out, specs, tokens),
            seconds=round(time.perf_counter() - started, 1),
            mb_sent_per_owner=round(max(sent.values()) / 1e6, 2),
        )


if __name__ == "__main__":
    main()
