"""The experiment: the merged model, its variants and every baseline, scored on the same text.

The result is an :class:`~flexmoe.evaluate.registry.Evaluation` (``models``: registry name ->
domain -> score; ``routing``: domain -> expert -> share) that :mod:`flexmoe_lab.report`
turns into tables and plots.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from flexmoe.anchor import load_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.evaluate.baselines import baseline_names, build_baseline
from flexmoe.evaluate.cost import Shape, relative_cost
from flexmoe.evaluate.mixed import HeldOutText
from flexmoe.evaluate.perplexity import eval_seq_len, evaluate_loaded
from flexmoe.evaluate.registry import (
    BIAS,
    NO_BIAS,
    PREFIX,
    TUNED,
    DomainScore,
    Evaluation,
    top_k,
    without,
)
from flexmoe.evaluate.routing import routing_matrix
from flexmoe.expert.package import load_package
from flexmoe.inference.selection import load_selected
from flexmoe.merge.layout import APPLY_BIAS, MergedModel, load_merged
from flexmoe.merge.slots import SlotInfo

Log = Callable[[str], None]


def variant_names(
    experts: list[str], *, default_top_k: int, every: bool = True, slots: int | None = None
) -> list[str]:
    """The merged model's variants: every top-k of its ``slots`` (default: the owners' and the
    public expert) and the owners' biases flipped (only with ``every``), document-level
    routing, each owner's expert left out."""
    total = slots or len(experts) + 1
    tops = [top_k(k) for k in range(1, total + 1) if k != default_top_k]
    flips = [*tops, NO_BIAS if APPLY_BIAS else BIAS] if every else []
    return [*flips, PREFIX, *(without(name) for name in experts)]


def _scores(
    model: Any,
    tokenizer: Any,
    scored: list[DataSpec | HeldOutText],
    seq_len: int | None,
    sample: dict[str, Any],
) -> dict[str, DomainScore]:
    """One model's score on every domain and mixture, as the evaluation records it."""
    found = evaluate_loaded(model, tokenizer, scored, seq_len=seq_len, **sample)
    return {s.domain: DomainScore.model_validate(asdict(s)) for s in found}


def run_suite(
    *,
    anchor_dir: Path,
    package_dirs: list[Path],
    merged_dir: Path,
    data: list[DataSpec],
    device: torch.device,
    cache_dir: Path | None,
    unrestricted_dir: Path | None = None,
    tuned_dir: Path | None = None,
    extra_models: dict[str, Path] | None = None,
    mixtures: list[HeldOutText] | None = None,
    only: list[str] | None = None,
    max_documents: int | None = None,
    max_bytes: int | None = None,
    seq_len: int | None = None,
    every_variant: bool = True,
    log: Log = print,
) -> Evaluation:
    """Score every model named in ``only`` (default: every baseline, then every variant, the
    other top-k and bias ones only with ``every_variant``). ``tuned_dir`` is scored as
    ``flexmoe:tuned``; ``extra_models`` maps more registry names to merged model directories
    (ablations), each loaded with the owners' choice applied. Every model is also scored on
    ``mixtures`` (text that needs two experts) and priced in inference FLOPs per token relative
    to the anchor (:mod:`flexmoe.evaluate.cost`)."""
    extra = {**({TUNED: tuned_dir} if tuned_dir else {}), **(extra_models or {})}
    anchor = load_anchor(anchor_dir)
    packages = [load_package(p, anchor) for p in package_dirs]
    experts = [p.manifest.name for p in packages]
    merged = MergedModel(merged_dir)
    table = merged.table()  # read once: the slots and the config's top-k checked against it
    slots, top_k = table.infos(), int(merged.config(table).num_experts_per_tok)
    names = only or [
        *baseline_names(packages, unrestricted=unrestricted_dir is not None),
        *variant_names(experts, default_top_k=top_k, every=every_variant, slots=len(slots)),
        *extra,
    ]
    sample: dict[str, Any] = {"device": device, "cache_dir": cache_dir}  # the same text for all
    sample.update(max_documents=max_documents, max_bytes=max_bytes)
    mixed = list(mixtures or [])
    scored: list[DataSpec | HeldOutText] = [*data, *mixed]
    shape = Shape.of(anchor.model.config, seq_len=seq_len or eval_seq_len(anchor.model.config))
    built = functools.partial(
        build_baseline,
        anchor=anchor,
        packages=packages,
        device=device,
        merged_dir=merged_dir,
        unrestricted_dir=unrestricted_dir,
    )
    models: dict[str, dict[str, DomainScore]] = {}
    seconds: dict[str, float] = {}
    for name in names:
        started = time.perf_counter()
        log(f"scoring {name}")
        model = load_selected(extra[name]) if name in extra else built(name)
        models[name] = _scores(model, anchor.tokenizer, scored, seq_len, sample)
        seconds[name] = round(time.perf_counter() - started, 1)
    rivals = max(0, len(slots) - 1 - len(experts))  # the coordinator's, kept in the merge
    owners = len(experts)
    price = functools.partial(relative_cost, shape=shape, owners=owners, top_k=top_k, rivals=rivals)
    routed = {"routing": merged_dir, "routing_tuned": tuned_dir}
    routings = _routings(routed, anchor.tokenizer, data, slots, log=log, **sample)
    return Evaluation(
        domains=[spec.domain for spec in data],
        experts=experts,
        public_expert=slots[0].name,
        top_k=top_k,
        default_bias=APPLY_BIAS,
        max_documents=max_documents,
        max_bytes=max_bytes,
        models=models,
        order=list(models),
        seconds=seconds,
        mixtures=[m.domain for m in mixed],
        cost={name: round(price(name), 3) for name in models},
        **routings,
    )


def _routings(
    routed: dict[str, Path | None],
    tokenizer: PreTrainedTokenizerBase,
    data: list[DataSpec],
    slots: list[SlotInfo],
    *,
    device: torch.device,
    cache_dir: Path | None,
    max_documents: int | None,
    max_bytes: int | None,
    log: Log,
) -> dict[str, dict[str, dict[str, float]]]:
    """Each merged model's routing shares per domain, under its key in the results."""
    routings: dict[str, dict[str, dict[str, float]]] = {}
    for key, model_dir in routed.items():
        if model_dir is None:
            continue
        log(f"routing shares per domain of {model_dir.name}")
        routings[key] = routing_matrix(
            load_merged(model_dir),
            tokenizer,
            data,
            [s.name for s in slots],
            device=device,
            cache_dir=cache_dir,
            max_documents=max_documents,
            max_bytes=max_bytes,
        )
    return routings
