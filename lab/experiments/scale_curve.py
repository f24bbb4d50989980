"""The gap between flexmoe and Branch-Train-Merge as expert training grows: one JSON line per
length.

Reuses a finished demo run's anchor and corpus set; for each number of expert steps, trains
every owner's expert (the demo's expert settings otherwise), merges them (the demo's top-k) and
scores btm, seq-route and flexmoe on the same held-out text as the report.

    python lab/experiments/scale_curve.py RUN --corpora demo --steps 30,60,120 --out CURVE_DIR
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from flexmoe.data.documents import DataSpec
from flexmoe.evaluate.suite import run_suite
from flexmoe.expert.spec import ExpertIdentity, ExpertSpec, PublicShare
from flexmoe.expert.train import train_expert
from flexmoe.merge.build import build_merged
from flexmoe.merge.plan import plan_merge
from flexmoe_lab.corpora import corpora_dir, corpus_set
from flexmoe_lab.settings import load_settings

COMPARED = ["btm", "seq-route", "flexmoe"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished demo output directory (its anchor)")
    parser.add_argument("--corpora", default="demo")
    parser.add_argument("--steps", default="30,60,120", help="expert lengths, comma-separated")
    parser.add_argument("--settings", default="full", help="the demo settings to start from")
    parser.add_argument(
        "--public-fraction",
        type=float,
        default=0.25,
        help="public share of each expert's training text",
    )
    parser.add_argument("--out", type=Path, required=True, help="where experts and merges go")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "flexmoe")
    args = parser.parse_args()
    corpora = corpus_set(args.corpora)
    settings = load_settings(args.settings)
    folder = corpora_dir(args.cache_dir, corpora)
    specs = {
        d.name: DataSpec(domain=d.name, paths=(str(folder / f"{d.name}.jsonl"),), id_field="id")
        for d in corpora.domains
    }
    anchor_dir, tokens, device = args.run / "anchor", args.cache_dir / "tokens", torch.device("cpu")
    for steps in (int(s) for s in args.steps.split(",")):
        started = time.perf_counter()
        cfg = replace(
            settings.expert,
            steps=steps,
            warmup_steps=max(1, steps // 10),
            eval_every=0,
            checkpoint_every=0,
        )
        root = args.out / f"steps-{steps}-public-{args.public_fraction}"
        packages = []
        for owner in corpora.owners:
            package = root / "experts" / owner.name
            train_expert(
                ExpertSpec(
                    anchor=anchor_dir,
                    data=[specs[owner.name]],
                    schedule=cfg,
                    identity=ExpertIdentity(owner.name, owner.owner, owner.license),
                    public=PublicShare(
                        data=[specs[corpora.public.name]], fraction=args.public_fraction
                    ),
                ),
                out=package,
                device=device,
                cache_dir=tokens,
                overwrite=True,
                progress=False,
            )
            packages.append(package)
        merged = root / "merged"
        build_merged(
            plan_merge(anchor_dir, packages, top_k=settings.top_k),
            merged,
            overwrite=True,
            progress=False,
        )
        scores = run_suite(
            anchor_dir=anchor_dir,
            package_dirs=packages,
            merged_dir=merged,
            data=list(specs.values()),
            device=device,
            cache_dir=tokens,
            only=COMPARED,
            max_bytes=settings.eval_bytes,
            log=lambda _: None,
        )
        average = {
            name: sum(d["bits_per_byte"] for d in row.values()) / len(row)
            for name, row in scores["models"].items()
        }
        print(
            json.dumps(
                {
                    "corpora": corpora.name,
                    "expert_steps": steps,
                    "public_fraction": args.public_fraction,
                    "expert_tokens": steps * cfg.batch_size * cfg.seq_len,
                    "average_bpb": {k: round(v, 4) for k, v in average.items()},
                    "flexmoe_vs_btm": round(average["flexmoe"] / average["btm"] - 1, 4),
                    "flexmoe_vs_seq_route": round(average["flexmoe"] / average["seq-route"] - 1, 4),
                    "seconds": round(time.perf_counter() - started, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
