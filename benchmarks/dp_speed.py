"""Training speed of an expert with and without DP-SGD, side by side on the same anchor and data.

Alternates a plain run and a DP run (``--repeats`` times each, so that the machine's drift hits
both) of ``--steps`` steps, and prints one JSON object: tokens/s of each run, their medians and
the ratio DP / plain.

    python benchmarks/dp_speed.py demo-output/anchor --data ~/.cache/flexmoe/demo-corpora/legal.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from flexmoe.anchor import load_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.data.packing import pack_documents
from flexmoe.data.split import load_splits
from flexmoe.device import pick_device
from flexmoe.expert.private import PrivacySettings, train_private
from flexmoe.expert.train import EXPERT_DEFAULTS, build_trainable_moe, project_biases
from flexmoe.training.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("anchor", type=Path)
    parser.add_argument("--data", required=True, help="owner's files")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    anchor = load_anchor(args.anchor, device=device)
    docs = load_splits([DataSpec("owner", tuple(args.data.split(",")))]).train
    stream = pack_documents(docs, anchor.tokenizer, cache_dir=None)
    cfg = replace(EXPERT_DEFAULTS, steps=args.steps, batch_size=args.batch_size,
                  seq_len=args.seq_len, eval_every=0, checkpoint_every=0)  # fmt: skip
    rows = torch.randn(anchor.config.num_hidden_layers, anchor.config.hidden_size) * 0.1
    runs: dict[str, list[float]] = {"plain": [], "dp": []}
    for _ in range(args.repeats):
        for kind in ("plain", "dp"):
            model = build_trainable_moe(anchor.model, anchor.public_router, rows)
            if kind == "plain":
                result = train(model, train_stream=stream, val_stream=None, cfg=cfg,
                               device=device, after_step=project_biases, progress=False)  # fmt: skip
            else:
                result, _ = train_private(
                    model, train_stream=stream, val_stream=None, cfg=cfg,
                    privacy=PrivacySettings(8.0, 1e-5, 1.0), device=device,
                    after_step=project_biases, progress=False,
                )  # fmt: skip
            runs[kind].append(result.tokens / result.seconds)
    plain, dp = statistics.median(runs["plain"]), statistics.median(runs["dp"])
    print(json.dumps({
        "device": str(device), "steps": args.steps, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "tokens_per_s": runs, "median_plain": plain, "median_dp": dp,
        "dp_over_plain": dp / plain,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
