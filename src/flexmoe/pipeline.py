"""The demo pipeline, end to end as far as it exists: corpora -> tokenizer -> anchor -> report."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from flexmoe.anchor import train_anchor
from flexmoe.data.demo import DOMAINS, fetch_demo_corpora
from flexmoe.data.documents import DataSpec
from flexmoe.evaluate.perplexity import DomainScore, evaluate_model, format_table
from flexmoe.io import atomic_write_bytes, write_json
from flexmoe.model.config import PRESETS, Preset
from flexmoe.training.config import TrainConfig


@dataclass(frozen=True)
class DemoSettings:
    vocab_size: int
    cfg: TrainConfig


FULL = DemoSettings(
    vocab_size=4096,
    cfg=TrainConfig(
        steps=400,
        batch_size=16,
        seq_len=128,
        lr=3e-3,
        warmup_steps=40,
        eval_every=100,
        checkpoint_every=100,
    ),
)
QUICK = DemoSettings(
    vocab_size=2048,
    cfg=TrainConfig(
        steps=120,
        batch_size=8,
        seq_len=128,
        lr=3e-3,
        warmup_steps=12,
        eval_every=40,
        checkpoint_every=40,
    ),
)


def run_demo(
    out: Path, *, cache_dir: Path, device: torch.device, quick: bool = False,
    log: Callable[[str], None] = print,
) -> list[DomainScore]:  # fmt: skip
    """Fetch the demo corpora, train a tiny anchor on the public domain, score every domain."""
    settings = QUICK if quick else FULL
    started = time.perf_counter()
    corpora = fetch_demo_corpora(cache_dir / "demo-corpora", log=log)
    specs = [DataSpec(domain=d.name, paths=(str(corpora[d.name]),), id_field="id") for d in DOMAINS]
    public = [s for s in specs if s.domain == "public"]
    anchor_dir = out / "anchor"
    log(f"training the anchor ({'quick' if quick else 'full'} settings) -> {anchor_dir}")
    manifest, result = train_anchor(
        data=public, out=anchor_dir, dims=PRESETS[Preset.TINY], cfg=settings.cfg, device=device,
        cache_dir=cache_dir / "tokens", vocab_size=settings.vocab_size, overwrite=True,
    )  # fmt: skip
    log("evaluating the anchor on every domain's held-out test split")
    scores = evaluate_model(anchor_dir, specs, device=device, cache_dir=cache_dir / "tokens")
    table = format_table(scores)
    log(table)
    elapsed = time.perf_counter() - started
    results = {
        "settings": {"quick": quick, "vocab_size": settings.vocab_size, **settings.cfg.to_dict()},
        "anchor": {"fingerprint": manifest.fingerprint, "training": manifest.training},
        "scores": [s.to_dict() for s in scores],
        "seconds": round(elapsed, 1),
        "device": str(device),
    }
    write_json(out / "results.json", results)
    atomic_write_bytes(out / "report.md", _report(results, table, result.history).encode())
    log(f"report: {out / 'report.md'} ({elapsed:.0f} s)")
    return scores


def _report(results: dict, table: str, history: list[dict[str, float]]) -> str:
    training = results["anchor"]["training"]
    curve = [h for h in history if "val_loss" in h]
    curve_lines = "\n".join(
        f"| {h['step']} | {h['loss']:.4f} | {h['val_loss']:.4f} |" for h in curve
    )
    return f"""# flexmoe demo report

Stage reached: corpora, tokenizer and public anchor. Expert training, merging and the baselines
come in later stages of the pipeline.

The anchor is a tiny OLMo-2 decoder trained only on the public domain (State of the Union
addresses). Its held-out bits per byte on the other domains show what a public model knows of
them before any data owner contributes an expert.

- device: {results["device"]}; wall time: {results["seconds"]} s
- anchor: {training["steps"]} steps, {training["tokens"]:,} tokens, final train loss
  {training["final_train_loss"]:.4f}, validation loss {training["final_val_loss"]:.4f}
- anchor fingerprint: `{results["anchor"]["fingerprint"][:16]}...`

## Held-out scores of the anchor (test split)

```
{table}
```

## Anchor training curve

| step | train loss | validation loss |
| ---: | ---: | ---: |
{curve_lines}

All numbers are in `results.json`.
"""


def load_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())
