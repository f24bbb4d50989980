"""Domain-informed router rows: a small registry of methods keyed by name.

Each method maps a domain's documents to one router row per layer, ``(layers, hidden)``, of unit
length: the public row r_0 when the anchor is made, an owner's row r_1 before its expert trains.

- ``anchor-hidden``: the mean hidden state entering each layer's feed-forward (the anchor's own
  view of the domain), per layer.
- ``embedder``: the paper's way: the mean embedding of the documents from a sentence-embedding
  model, mapped to the hidden size by a seeded projection; the same row in every layer.
- ``random``: seeded Gaussian rows, for ablations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flexmoe.errors import FlexMoEError
from flexmoe.model.embedder import Embedder, projection
from flexmoe.model.probe import mean_ffn_inputs, unit_rows

Params = dict[str, str | int | float]


class RouterInitMethod(StrEnum):
    ANCHOR_HIDDEN = "anchor-hidden"
    EMBEDDER = "embedder"
    RANDOM = "random"


@dataclass(frozen=True)
class RouterInitRequest:
    """What a method may use: the dense anchor model, the domain's texts, and settings."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    texts: list[str]
    device: torch.device
    seed: int = 0
    max_documents: int = 1000
    max_tokens: int = 256
    embedder: Path | None = None
    projection_seed: int = 0


def _anchor_hidden(req: RouterInitRequest) -> tuple[torch.Tensor, Params]:
    sample = req.texts[: req.max_documents]
    rows = mean_ffn_inputs(
        req.model, req.tokenizer, sample, max_tokens=req.max_tokens, device=req.device
    )
    return unit_rows(rows), {"documents": len(sample), "max_tokens_per_document": req.max_tokens}


def _embedder(req: RouterInitRequest) -> tuple[torch.Tensor, Params]:
    if req.embedder is None:
        raise FlexMoEError("--embedder", "the embedder method needs a local embedding model path")
    embedder = Embedder(req.embedder, device=req.device)
    sample = req.texts[: req.max_documents]
    mean = embedder.mean_embedding(sample, max_tokens=req.max_tokens)  # (E,)
    config = req.model.config
    proj = projection(
        req.projection_seed, hidden_size=config.hidden_size, embedding_dim=embedder.dim
    )
    row = unit_rows((proj @ mean)[None])[0]  # (H,)
    params: Params = {
        "documents": len(sample),
        "max_tokens_per_document": req.max_tokens,
        "embedder_fingerprint": embedder.fingerprint(),
        "embedding_dim": embedder.dim,
        "projection_seed": req.projection_seed,
    }
    return row.expand(config.num_hidden_layers, -1).clone(), params


def _random(req: RouterInitRequest) -> tuple[torch.Tensor, Params]:
    config = req.model.config
    gen = torch.Generator().manual_seed(req.seed)
    rows = torch.randn(config.num_hidden_layers, config.hidden_size, generator=gen)
    return unit_rows(rows), {"seed": req.seed}


ROUTER_INITS: dict[RouterInitMethod, Callable[[RouterInitRequest], tuple[torch.Tensor, Params]]] = {
    RouterInitMethod.ANCHOR_HIDDEN: _anchor_hidden,
    RouterInitMethod.EMBEDDER: _embedder,
    RouterInitMethod.RANDOM: _random,
}


def domain_rows(method: RouterInitMethod, req: RouterInitRequest) -> tuple[torch.Tensor, Params]:
    """Unit-length router rows ``(layers, hidden)`` for a domain, and what made them."""
    return ROUTER_INITS[method](req)


def parse_method(value: str) -> RouterInitMethod:
    if value not in {m.value for m in RouterInitMethod}:
        choices = ", ".join(m.value for m in RouterInitMethod)
        raise FlexMoEError("--router-init", f"unknown method {value!r}; choose {choices}")
    return RouterInitMethod(value)
