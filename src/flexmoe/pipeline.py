"""The demo pipeline, end to end as far as it exists today.

corpora -> tokenizer -> anchor -> one expert per owner domain (each trained in its own process
that is given only that domain's files and the public corpus) -> held-out scores -> report.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexmoe.anchor import load_anchor, train_anchor
from flexmoe.data.demo import DOMAINS, fetch_demo_corpora
from flexmoe.data.documents import DataSpec
from flexmoe.errors import FlexMoEError
from flexmoe.evaluate.perplexity import DomainScore, evaluate_loaded, format_table
from flexmoe.expert.package import build_specialist, load_package
from flexmoe.io import atomic_write_bytes, write_json
from flexmoe.model.config import PRESETS, Preset
from flexmoe.training.config import TrainConfig

# Who owns each demo domain, and under which license its text is shared.
OWNERS = {
    "code": ("Python Software Foundation", "Python-2.0"),
    "legal": ("SPDX workgroup", "CC-BY-3.0"),
    "dialogue": ("chitchat-dataset authors", "MIT"),
    "literature": ("Project Gutenberg", "LicenseRef-Public-Domain"),
}


@dataclass(frozen=True)
class DemoSettings:
    vocab_size: int
    anchor: TrainConfig
    expert: TrainConfig
    eval_documents: int | None  # per domain; None scores the whole test split


FULL = DemoSettings(
    vocab_size=4096,
    anchor=TrainConfig(steps=400, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=40,
                       eval_every=100, checkpoint_every=100),
    expert=TrainConfig(steps=100, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=10,
                       weight_decay=0.0, eval_every=50, checkpoint_every=50, z_loss=1e-3),
    eval_documents=None,
)  # fmt: skip
QUICK = DemoSettings(
    vocab_size=2048,
    anchor=TrainConfig(steps=120, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=12,
                       eval_every=40, checkpoint_every=40),
    expert=TrainConfig(steps=30, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=3,
                       weight_decay=0.0, eval_every=15, checkpoint_every=15, z_loss=1e-3),
    eval_documents=8,
)  # fmt: skip


def _train_expert_process(
    domain: str, corpus: Path, public: Path, anchor_dir: Path, out: Path, cfg: TrainConfig,
    cache_dir: Path, device: torch.device,
) -> None:  # fmt: skip
    """One owner, one process: it is handed only its own files (and the public corpus)."""
    owner, license_id = OWNERS[domain]
    command = [
        sys.executable, "-m", "flexmoe", "expert", "train", "--anchor", str(anchor_dir),
        "--data", str(corpus), "--id-field", "id", "--name", domain, "--owner", owner,
        "--license", license_id, "--public-data", str(public), "--out", str(out), "--force",
        "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size),
        "--seq-len", str(cfg.seq_len), "--lr", str(cfg.lr), "--warmup-steps", str(cfg.warmup_steps),
        "--eval-every", str(cfg.eval_every), "--checkpoint-every", str(cfg.checkpoint_every),
        "--z-loss", str(cfg.z_loss), "--device", str(device), "--cache-dir", str(cache_dir),
    ]  # fmt: skip
    if subprocess.run(command, check=False).returncode != 0:
        raise FlexMoEError(out, f"training the {domain} expert failed (see its output above)")


def run_demo(
    out: Path, *, cache_dir: Path, device: torch.device, quick: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Fetch the corpora, train the anchor and one expert per owner domain, score, report."""
    settings = QUICK if quick else FULL
    started = time.perf_counter()
    corpora = fetch_demo_corpora(cache_dir / "demo-corpora", log=log)
    specs = {
        d.name: DataSpec(domain=d.name, paths=(str(corpora[d.name]),), id_field="id")
        for d in DOMAINS
    }
    tokens = cache_dir / "tokens"
    anchor_dir = out / "anchor"
    log(f"training the anchor ({'quick' if quick else 'full'} settings) -> {anchor_dir}")
    manifest, anchor_result = train_anchor(
        data=[specs["public"]], out=anchor_dir, dims=PRESETS[Preset.TINY], cfg=settings.anchor,
        device=device, cache_dir=tokens, vocab_size=settings.vocab_size, overwrite=True,
    )  # fmt: skip
    anchor = load_anchor(anchor_dir)
    log("evaluating the anchor on every domain's held-out test split")
    anchor_scores = {
        s.domain: s
        for s in evaluate_loaded(
            anchor.model,
            anchor.tokenizer,
            list(specs.values()),
            device=device,
            cache_dir=tokens,
            max_documents=settings.eval_documents,
        )
    }
    log(format_table(list(anchor_scores.values())))
    experts: dict[str, dict[str, Any]] = {}
    for domain in OWNERS:
        package_dir = out / "experts" / domain
        log(f"training the {domain} expert in its own process -> {package_dir}")
        _train_expert_process(
            domain, corpora[domain], corpora["public"], anchor_dir, package_dir,
            settings.expert, tokens, device,
        )  # fmt: skip
        package = load_package(package_dir, anchor)
        specialist = build_specialist(anchor, package)
        own, public = evaluate_loaded(
            specialist,
            anchor.tokenizer,
            [specs[domain], specs["public"]],
            device=device,
            cache_dir=tokens,
            max_documents=settings.eval_documents,
        )
        experts[domain] = {
            "owner": package.manifest.owner,
            "license": package.manifest.license,
            "training": package.manifest.training.model_dump(),
            "own_domain": own.to_dict(),
            "public": public.to_dict(),
        }
        log(
            f"{domain}: specialist {own.bits_per_byte:.4f} bpb vs anchor "
            f"{anchor_scores[domain].bits_per_byte:.4f}; on public {public.bits_per_byte:.4f} "
            f"vs {anchor_scores['public'].bits_per_byte:.4f}"
        )
    elapsed = time.perf_counter() - started
    results = {
        "settings": {
            "quick": quick, "vocab_size": settings.vocab_size,
            "eval_documents_per_domain": settings.eval_documents,
            "anchor": settings.anchor.to_dict(), "expert": settings.expert.to_dict(),
        },
        "anchor": {"fingerprint": manifest.fingerprint, "training": manifest.training},
        "anchor_scores": [s.to_dict() for s in anchor_scores.values()],
        "experts": experts,
        "seconds": round(elapsed, 1),
        "device": str(device),
    }  # fmt: skip
    write_json(out / "results.json", results)
    report = _report(results, anchor_scores, anchor_result.history)
    atomic_write_bytes(out / "report.md", report.encode())
    log(_specialist_table(results, anchor_scores))
    log(f"report: {out / 'report.md'} ({elapsed:.0f} s)")
    return results


def _specialist_table(results: dict[str, Any], anchor: dict[str, DomainScore]) -> str:
    lines = [
        "| domain | anchor bpb | specialist bpb | change "
        "| public bpb: anchor | specialist | change |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base_public = anchor["public"].bits_per_byte
    for domain, row in results["experts"].items():
        own, pub = row["own_domain"]["bits_per_byte"], row["public"]["bits_per_byte"]
        base = anchor[domain].bits_per_byte
        lines.append(
            f"| {domain} | {base:.4f} | {own:.4f} | {own / base - 1:+.1%} "
            f"| {base_public:.4f} | {pub:.4f} | {pub / base_public - 1:+.1%} |"
        )
    return "\n".join(lines)


def _report(
    results: dict[str, Any], anchor: dict[str, DomainScore], history: list[dict[str, float]]
) -> str:
    training = results["anchor"]["training"]
    expert_cfg = results["settings"]["expert"]
    fractions = {
        e["training"]["hyperparameters"]["public_fraction"] for e in results["experts"].values()
    }
    public_share = ", ".join(f"{f:.0%}" for f in sorted(fractions))
    curve = "\n".join(
        f"| {h['step']} | {h['loss']:.4f} | {h['val_loss']:.4f} |"
        for h in history
        if "val_loss" in h
    )
    return f"""# flexmoe demo report

Stage reached: corpora, tokenizer, public anchor, and one expert per data owner. Merging, opt-out
and the paper's baselines come in later stages of the pipeline.

The anchor is a tiny OLMo-2 decoder trained only on the public domain (State of the Union
addresses). Each owner then trained one expert alone, in its own process that was handed only
its own domain's files and the public corpus, against the frozen anchor ({expert_cfg["steps"]}
steps of {expert_cfg["batch_size"]} x {expert_cfg["seq_len"]} tokens, {public_share} of them
public text), and shipped only the expert.

- device: {results["device"]}; wall time: {results["seconds"]} s
- anchor: {training["steps"]} steps, {training["tokens"]:,} tokens, final train loss
  {training["final_train_loss"]:.4f}, validation loss {training["final_val_loss"]:.4f}
- anchor fingerprint: `{results["anchor"]["fingerprint"][:16]}...`

## Held-out scores of the anchor (test split)

```
{format_table(list(anchor.values()))}
```

## Each owner's 2-expert specialist next to the anchor (bits per byte, test split)

{_specialist_table(results, anchor)}

## Anchor training curve

| step | train loss | validation loss |
| ---: | ---: | ---: |
{curve}

All numbers are in `results.json`.
"""
