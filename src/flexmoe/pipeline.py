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
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.errors import FlexMoEError
from flexmoe.evaluate.perplexity import DomainScore, evaluate_loaded, format_table
from flexmoe.expert.package import build_specialist, load_package
from flexmoe.inference.generate import format_attribution, generate
from flexmoe.inference.selection import Selection, current_mask, set_expert_mask
from flexmoe.io import atomic_write_bytes, write_json
from flexmoe.merge.build import APPLY_BIAS, build_merged, load_merged
from flexmoe.merge.edit import remove_expert
from flexmoe.merge.plan import plan_merge
from flexmoe.merge.slots import read_slots
from flexmoe.merge.standing import StandingStore, standing_exclusions
from flexmoe.model.checkpoint import moe_layers
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
    top_k: int = 3  # experts active per token in the merged model (of 5)


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
    merged = _merge_stage(
        out, anchor_dir, [out / "experts" / d for d in OWNERS], specs, settings, device, tokens,
        log,
    )  # fmt: skip
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
        "merged": merged,
        "seconds": round(elapsed, 1),
        "device": str(device),
    }  # fmt: skip
    write_json(out / "results.json", results)
    report = _report(results, anchor_scores, anchor_result.history)
    atomic_write_bytes(out / "report.md", report.encode())
    log(_specialist_table(results, anchor_scores))
    log(_merged_table(results, anchor_scores))
    log(f"report: {out / 'report.md'} ({elapsed:.0f} s)")
    return results


OPT_OUT = "legal"  # the owner who opts out in the demo
OPT_OUT_PROMPT = "Permission is hereby granted, free of charge, to any person"


def _merge_stage(
    out: Path, anchor_dir: Path, packages: list[Path], specs: dict[str, DataSpec],
    settings: DemoSettings, device: torch.device, tokens: Path, log: Callable[[str], None],
    opt_out: str = OPT_OUT, prompt: str = OPT_OUT_PROMPT,
) -> dict[str, Any]:  # fmt: skip
    """Merge every expert; score with and without the owners' biases; one owner opts out (and
    back in); check the opt-out against a model merged without that expert."""
    merged_dir = out / "merged"
    log(f"merging the anchor and {len(packages)} experts (top-{settings.top_k}) -> {merged_dir}")
    build_merged(plan_merge(anchor_dir, packages, top_k=settings.top_k), merged_dir, overwrite=True)
    model, tokenizer = load_merged(merged_dir), load_tokenizer(merged_dir)
    slots = read_slots(merged_dir)
    every = list(specs.values())

    def score(data: list[DataSpec], net: Any = model) -> dict[str, DomainScore]:
        found = evaluate_loaded(
            net, tokenizer, data, device=device, cache_dir=tokens,
            max_documents=settings.eval_documents,
        )  # fmt: skip
        return {s.domain: s for s in found}

    log("evaluating the merged model (owners' biases off, the default)")
    plain = score(every)
    log("evaluating the merged model with the owners' biases on")
    for layer in moe_layers(model):
        layer.use_bias = True
    with_bias = score(every)
    for layer in moe_layers(model):
        layer.use_bias = APPLY_BIAS

    def attribution(label: str) -> dict[str, Any]:
        result = generate(
            model, tokenizer, prompt, slots=slots, max_new_tokens=24, seed=0,
            selection=Selection(opted_out=standing_exclusions(merged_dir, slots)),
        )  # fmt: skip
        log(f"{label}: {prompt}{result.text}")
        log(format_attribution(result, slots))
        return {"text": result.text, "prompt": result.prompt_shares,
                "generated": result.generated_shares}  # fmt: skip

    before = attribution(f"generation with every expert ({opt_out} in)")
    store = StandingStore(merged_dir)
    store.set(opt_out, opted_out=True, reason="demo: the owner withdraws", actor="demo")
    log(f"{opt_out} opted out; the same loaded model, no reload")
    after = attribution(f"generation after {opt_out} opted out")
    set_expert_mask(model, current_mask(merged_dir, slots, Selection()))
    opted_out = score(every)
    set_expert_mask(model, None)
    without_dir = out / f"merged-without-{opt_out}"
    remove_expert(merged_dir, opt_out, out=without_dir)  # carries the opt-out store along
    without = score([specs[opt_out]], load_merged(without_dir))[opt_out]
    gap = abs(without.bits_per_byte - opted_out[opt_out].bits_per_byte)
    log(f"{opt_out}: opted out {opted_out[opt_out].bits_per_byte:.6f} bpb, merged without it "
        f"{without.bits_per_byte:.6f} (difference {gap:.1e})")  # fmt: skip
    store.set(opt_out, opted_out=False, reason="demo: the owner returns", actor="demo")
    audit = [list(row) for row in store.audit()]
    store.close()
    return {
        "top_k": settings.top_k,
        "default_bias": APPLY_BIAS,
        "scores": {d: s.to_dict() for d, s in plain.items()},
        "scores_with_bias": {d: s.to_dict() for d, s in with_bias.items()},
        "opt_out": {
            "expert": opt_out,
            "prompt": prompt,
            "scores": {d: s.to_dict() for d, s in opted_out.items()},
            "merged_without": without.to_dict(),
            "bpb_difference_vs_merged_without": gap,
            "generation_before": before,
            "generation_after": after,
            "audit": audit,
        },
    }


def _merged_table(results: dict[str, Any], anchor: dict[str, DomainScore]) -> str:
    merged = results["merged"]
    out_name = merged["opt_out"]["expert"]
    lines = [
        f"| domain | anchor | own specialist | merged | merged, biases on "
        f"| merged, {out_name} opted out |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for domain, base in anchor.items():
        spec = results["experts"].get(domain, {}).get("own_domain", {}).get("bits_per_byte")
        m = merged["scores"][domain]["bits_per_byte"]
        b = merged["scores_with_bias"][domain]["bits_per_byte"]
        o = merged["opt_out"]["scores"][domain]["bits_per_byte"]
        own = f"{spec:.4f}" if spec is not None else "-"
        lines.append(
            f"| {domain} | {base.bits_per_byte:.4f} | {own} | {m:.4f} | {b:.4f} | {o:.4f} |"
        )
    return "\n".join(lines)


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
    merged, opt = results["merged"], results["merged"]["opt_out"]
    bias_default = "on" if merged["default_bias"] else "off"
    shares = "\n".join(
        f"| {name} | {opt['generation_before']['generated'].get(name, 0.0):.1%} "
        f"| {opt['generation_after']['generated'].get(name, 0.0):.1%} |"
        for name in opt["generation_before"]["generated"]
    )
    audit = "\n".join(f"- {row[0]} {row[1]} {row[2]}: {row[3]}" for row in opt["audit"])
    curve = "\n".join(
        f"| {h['step']} | {h['loss']:.4f} | {h['val_loss']:.4f} |"
        for h in history
        if "val_loss" in h
    )
    return f"""# flexmoe demo report

Stage reached: corpora, tokenizer, public anchor, one expert per data owner, the merged model,
and one owner's opt-out. The paper's baselines come in a later stage of the pipeline.

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

## The merged model (bits per byte, test split)

The anchor (public expert) and all four experts merged into one FlexOlmo model,
top-{merged["top_k"]} of {len(results["experts"]) + 1} experts per token, router not tuned after
merging. The owners' learned biases are {bias_default} by default; the column with them on is
measured on the same model. Then the {opt["expert"]} owner opts out (`flexmoe experts opt-out`):
the same loaded model, no reload.

{_merged_table(results, anchor)}

Opting out is exact: on {opt["expert"]} text the opted-out model scores
{opt["scores"][opt["expert"]]["bits_per_byte"]:.6f} bpb and a model merged without that expert
(`flexmoe merge remove`) {opt["merged_without"]["bits_per_byte"]:.6f} (difference
{opt["bpb_difference_vs_merged_without"]:.1e}).

Generation from "{opt["prompt"]}" (seed 0), share of routing mass per expert over the generated
tokens:

| expert | every expert in | {opt["expert"]} opted out |
| --- | ---: | ---: |
{shares}

The owner then opted back in; the audit log of the model's opt-out store holds both changes:
{audit}

## Anchor training curve

| step | train loss | validation loss |
| ---: | ---: | ---: |
{curve}

All numbers are in `results.json`.
"""
