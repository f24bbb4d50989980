"""Federated recipes measured on a finished demo run: one JSON line per recipe.

Each recipe is ``E:R:S:T``: every owner's expert first trained for E steps alone (as the demo
trains it, against the run's anchor), merged, then R federated rounds (``flexmoe fed
simulate``, every owner a Flower client) of S slot steps and T router steps per owner. An
owner's compute is E + R (S + T) steps of the demo's batch; the run's btm specialists trained
for the demo's expert steps. Every model is scored on the same held-out text as the report
(bits per byte per domain, the public domain included); the first line of each expert-step
count is its untuned merge.

Usage (after ``flexmoe demo --out RUN [--corpora NAME]``):

    python experiments/federated_recipes.py RUN --corpora demo --recipes 30:1:15:15,30:2:8:7
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
from flexmoe.experiment.corpora import corpora_dir, corpus_set
from flexmoe.experiment.pipeline import FULL, _train_experts
from flexmoe.expert.package import load_package
from flexmoe.federated.flower import RoundPlan
from flexmoe.federated.owner import OwnerText
from flexmoe.federated.privacy import UpdatePrivacy
from flexmoe.federated.run import federate
from flexmoe.inference.selection import load_selected
from flexmoe.merge.build import build_merged
from flexmoe.merge.plan import plan_merge
from flexmoe.training.config import FEDERATED_SLOT

CPU = torch.device("cpu")


def merged_at(run: Path, steps: int, corpora: dict[str, Path], names: object, tokens: Path) -> Path:
    """The run's own merged model when ``steps`` is the demo's, else experts trained for
    ``steps`` and merged (kept under ``run/federated-recipes``)."""
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
    build_merged(
        plan_merge(run / "anchor", packages, top_k=FULL.top_k), root / "merged", progress=False
    )
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished demo output directory")
    parser.add_argument("--corpora", default="demo")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "flexmoe")
    parser.add_argument("--recipes", default="30:1:15:15")
    parser.add_argument("--slot-lr", type=float, default=FULL.expert.lr)
    parser.add_argument("--router-lr", type=float, default=FULL.tune.lr)
    parser.add_argument("--btm", action="store_true", help="also score btm (the run's experts)")
    parser.add_argument(
        "--router-sgd",
        action="store_true",
        help="router phases step with plain SGD (use a larger --router-lr)",
    )
    parser.add_argument(
        "--no-slot-row",
        action="store_true",
        help="slot phases train the expert only, not its router row",
    )
    parser.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        help="update-level differential privacy: every owner's epsilon over all its updates",
    )
    args = parser.parse_args()
    corpora = corpus_set(args.corpora)
    folder = corpora_dir(args.cache_dir, corpora)
    files = {d.name: folder / f"{d.name}.jsonl" for d in corpora.domains}
    specs = [DataSpec(n, (str(p),), id_field="id") for n, p in files.items()]
    public = (specs[0],)
    tokens = args.cache_dir / "tokens"
    owners = corpora.domains[1:]
    texts = [
        OwnerText(d.name, (DataSpec(d.name, (str(files[d.name]),), id_field="id"),), public)
        for d in owners
    ]
    if args.btm:
        anchor = load_anchor(args.run / "anchor")
        packages = [load_package(args.run / "experts" / d.name, anchor) for d in owners]
        btm = build_baseline("btm", anchor=anchor, packages=packages, device=CPU)
        scores = evaluate_loaded(
            btm, anchor.tokenizer, specs, device=CPU, cache_dir=tokens, max_bytes=FULL.eval_bytes
        )
        bpb = {s.domain: round(s.bits_per_byte, 4) for s in scores}
        print(
            json.dumps(
                {
                    "recipe": "btm",
                    "owner_steps": FULL.expert.steps,
                    "bpb": bpb,
                    "average": round(sum(bpb.values()) / len(bpb), 4),
                }
            ),
            flush=True,
        )
    scored: set[int] = set()
    for recipe in args.recipes.split(","):
        e, r, s, t = (int(x) for x in recipe.split(":"))
        merged = merged_at(args.run, e, files, owners, tokens)
        if e not in scored:
            scored.add(e)
            bpb = score(merged, specs, tokens)
            print(
                json.dumps(
                    {
                        "recipe": f"{e}:0:0:0",
                        "owner_steps": e,
                        "bpb": bpb,
                        "average": round(sum(bpb.values()) / len(bpb), 4),
                    }
                ),
                flush=True,
            )
        if r == 0:
            continue
        phases = tuple(p for p, n in (("slot", s), ("router", t)) if n)
        common = {"batch_size": FULL.expert.batch_size, "seq_len": FULL.expert.seq_len}
        plan = RoundPlan(
            rounds=r,
            phases=phases,  # type: ignore[arg-type]
            slot=replace(
                FEDERATED_SLOT,
                steps=max(s, 1),
                lr=args.slot_lr,
                warmup_steps=max(1, s // 10),
                **common,
            ),  # type: ignore[arg-type]
            router=replace(
                FEDERATED_SLOT,
                steps=max(t, 1),
                lr=args.router_lr,
                warmup_steps=max(1, t // 10),
                **common,
            ),  # type: ignore[arg-type]
        )
        if args.dp_epsilon is not None:
            privacy = UpdatePrivacy.for_budget(args.dp_epsilon, plan.releases(), clip=None)
            plan = replace(plan, privacy=privacy)
        dp = "" if args.dp_epsilon is None else f"-dp{args.dp_epsilon:g}"
        out = (
            args.run
            / "federated-recipes"
            / (
                recipe.replace(":", "-")
                + "-no-row" * args.no_slot_row
                + "-sgd" * args.router_sgd
                + dp
            )
        )
        started = time.perf_counter()
        federate(
            merged,
            texts,
            plan,
            out,
            device=CPU,
            cache_dir=tokens,
            overwrite=True,
            progress=False,
            slot_row=not args.no_slot_row,
            router_sgd=args.router_sgd,
        )
        bpb = score(out, specs, tokens)
        print(
            json.dumps(
                {
                    "recipe": recipe
                    + (" (slot phases: expert only)" if args.no_slot_row else "")
                    + (f" (router: SGD lr {args.router_lr})" if args.router_sgd else "")
                    + (f" (dp epsilon {args.dp_epsilon:g})" if dp else ""),
                    "owner_steps": e + r * (s + t),
                    "bpb": bpb,
                    "average": round(sum(bpb.values()) / len(bpb), 4),
                    "seconds": round(time.perf_counter() - started, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
