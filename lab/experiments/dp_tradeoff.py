"""What differential privacy costs an expert: quality, memorisation and speed at several epsilons.

On a finished demo run (its anchor and its corpus set), one owner's expert is trained again with
the demo's expert settings, once without DP and once per epsilon (DP-SGD, delta 1e-5, clip 1.0).
For each: held-out bits per byte of the owner's 2-expert specialist on its own text and on public
text, the extraction rate on its training documents (the demo's audit), and training tokens/s
(the loop alone, no evaluation or checkpoints in it; one run each, so see
``benchmarks/dp_speed.py`` for the speed ratio). Writes ``RUN/dp_tradeoff.json`` and adds its table
to ``RUN/report.md``.

Usage (after ``flexmoe-lab demo --out RUN [--corpora NAME]``):

    python lab/experiments/dp_tradeoff.py RUN --corpora demo --epsilons 8,1
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
from flexmoe.data.split import Split, load_splits
from flexmoe.evaluate.extraction import audit_extraction, sample_passages
from flexmoe.evaluate.specialist import evaluate_specialist
from flexmoe.expert.package import load_package
from flexmoe.expert.private import PrivacySettings
from flexmoe.expert.spec import ExpertIdentity, ExpertSpec, PublicShare
from flexmoe.expert.specialist import build_specialist
from flexmoe.expert.train import train_expert
from flexmoe.io import write_json
from flexmoe_lab.corpora import corpora_dir, corpus_set
from flexmoe_lab.report import DP_RESULTS as RESULTS
from flexmoe_lab.report import with_privacy_section
from flexmoe_lab.settings import load_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--corpora", default="demo")
    parser.add_argument("--domain", help="the owner (default: the corpus set's opt-out domain)")
    parser.add_argument("--epsilons", default="8,1")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "flexmoe")
    args = parser.parse_args()
    corpora = corpus_set(args.corpora)
    domain = args.domain or corpora.opt_out
    files = corpora_dir(args.cache_dir, corpora)
    own = DataSpec(domain, (str(files / f"{domain}.jsonl"),))
    public = DataSpec("public", (str(files / "public.jsonl"),))
    settings = load_settings("full")
    cfg = replace(settings.expert, eval_every=0, checkpoint_every=0)  # the loop alone is timed
    anchor_dir = args.run / "anchor"
    tokens_cache = args.cache_dir / "tokens"
    anchor = load_anchor(anchor_dir)
    audit = settings.audit
    passages = sample_passages(load_splits([own]).train, anchor.tokenizer, audit)
    rows = []
    for epsilon in [None, *(float(e) for e in args.epsilons.split(","))]:
        label = "no DP" if epsilon is None else f"epsilon {epsilon:g}"
        privacy = (
            None if epsilon is None else PrivacySettings(epsilon, args.delta, args.max_grad_norm)
        )
        out = args.run / "dp" / ("none" if epsilon is None else f"eps-{epsilon:g}")
        start = time.perf_counter()
        manifest, result = train_expert(
            ExpertSpec(
                anchor=anchor_dir,
                data=[own],
                schedule=cfg,
                identity=ExpertIdentity(name=domain, owner=f"{domain} owner", license="MIT"),
                privacy=privacy,
                public=PublicShare(data=[public]),
            ),
            out=out,
            device=torch.device("cpu"),
            cache_dir=tokens_cache,
            overwrite=True,
            progress=False,
        )
        wall = time.perf_counter() - start
        scores = evaluate_specialist(
            out,
            anchor_dir,
            [own, public],
            device=torch.device("cpu"),
            cache_dir=tokens_cache,
            split=Split.TEST,
        )
        specialist = build_specialist(anchor, load_package(out, anchor))
        extraction = audit_extraction(
            specialist, anchor.tokenizer, passages, audit, name=label, device=torch.device("cpu")
        )
        spent = manifest.training.privacy
        row = {
            "setting": label,
            "target_epsilon": epsilon,
            "epsilon": spent.epsilon if spent else None,
            "noise_multiplier": spent.noise_multiplier if spent else None,
            "steps": result.steps,
            "tokens": result.tokens,
            "tokens_per_s": result.tokens / result.seconds,
            "wall_s": wall,
            "bpb": {s.domain: s.specialist.bits_per_byte for s in scores},
            "anchor_bpb": {s.domain: s.anchor.bits_per_byte for s in scores},
            "extraction_rate": extraction.rate,
            "mean_best_similarity": extraction.mean_best_similarity,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    write_json(
        args.run / RESULTS,
        {
            "corpora": corpora.name,
            "domain": domain,
            "delta": args.delta,
            "max_grad_norm": args.max_grad_norm,
            "audit_documents": len(passages),
            "rows": rows,
        },
    )
    if (args.run / "report.md").is_file():
        with_privacy_section(args.run / "report.md", args.run / RESULTS)


if __name__ == "__main__":
    main()
