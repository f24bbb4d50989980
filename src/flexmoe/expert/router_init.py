"""Domain-informed router initialisation: a small registry of methods keyed by name.

Each method maps an owner's training documents to one router row per layer, ``(layers, hidden)``.
An owner's method must be the one the anchor's public row r_0 was made with, so that r_0 and
r_1 live in the same space; ``random`` (for ablations) is allowed with any anchor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import torch

from flexmoe.anchor import Anchor
from flexmoe.errors import FlexMoEError
from flexmoe.model.probe import mean_ffn_inputs, unit_rows


class RouterInitMethod(StrEnum):
    ANCHOR_HIDDEN = "anchor-hidden"
    RANDOM = "random"


@dataclass(frozen=True)
class RouterInitRequest:
    """What a method may use: the anchor, the owner's training texts, and its settings."""

    anchor: Anchor
    texts: list[str]
    seed: int
    device: torch.device
    max_documents: int = 1000
    max_tokens: int = 256


RouterRows = tuple[torch.Tensor, dict[str, str | int | float]]


def _anchor_hidden(req: RouterInitRequest) -> RouterRows:
    sample = req.texts[: req.max_documents]
    rows = mean_ffn_inputs(
        req.anchor.model, req.anchor.tokenizer, sample, max_tokens=req.max_tokens, device=req.device
    )
    rows = unit_rows(rows)
    return rows, {"documents": len(sample), "max_tokens_per_document": req.max_tokens}


def _random(req: RouterInitRequest) -> RouterRows:
    """Gaussian rows scaled to the norm of r_0 in each layer, from a seeded generator."""
    public = req.anchor.public_router  # (layers, hidden)
    gen = torch.Generator().manual_seed(req.seed)
    rows = unit_rows(torch.randn(public.shape, generator=gen)) * public.norm(dim=-1, keepdim=True)
    return rows, {"seed": req.seed}


ROUTER_INITS: dict[RouterInitMethod, Callable[[RouterInitRequest], RouterRows]] = {
    RouterInitMethod.ANCHOR_HIDDEN: _anchor_hidden,
    RouterInitMethod.RANDOM: _random,
}


def init_router_rows(method: RouterInitMethod, req: RouterInitRequest) -> RouterRows:
    """Router rows for the owner's expert; checks the method against the anchor's r_0."""
    anchor_method = req.anchor.manifest.router_init.method
    if method is not RouterInitMethod.RANDOM and method.value != anchor_method:
        raise FlexMoEError(
            "--router-init",
            f"{method.value} does not match the anchor's public router ({anchor_method}); "
            f"use --router-init {anchor_method}",
        )
    return ROUTER_INITS[method](req)
