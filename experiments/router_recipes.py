"""Router recipes measured at merge time on a finished demo run: one JSON line per recipe.

Keeps the merged model's experts and swaps only its router, so that recipes are compared on the
same experts and the same held-out text (bits per byte, as the report scores them):

- ``trained``: the owners' trained rows, as merged (the default today);
- ``lda``: a shared-covariance Gaussian router. Per layer, each domain d (public and every owner)
  has the mean feed-forward input mu_d of its training documents in the anchor, and Sigma is the
  covariance of the public documents' inputs (shrunk toward a multiple of the identity). Then
  ``logit_d = (Sigma^-1 mu_d) . h - mu_d' Sigma^-1 mu_d / 2``, divided by a temperature: each
  owner's score is its log-likelihood under one shared model, so scores made apart compare.
  (Here the means are computed in one process for the measurement; in a recipe each owner would
  compute its own mean at home and the anchor would publish mu_0 and Sigma.)
- ``lda-specialist``: the same, with each owner's mean taken in its own specialist model;
- ``lda+trained``: the Gaussian router's logits plus the trained rows' logits (the trained rows
  keep each owner's own public-vs-expert split; the Gaussian part says whose text it is).

Usage (after ``flexmoe demo --out RUN [--corpora NAME]``):

    python experiments/router_recipes.py RUN --corpora demo --recipes trained,lda
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from flexmoe.anchor import Anchor, load_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.data.packing import TokenStream, pack_documents
from flexmoe.data.split import load_splits
from flexmoe.evaluate.perplexity import evaluate_loaded
from flexmoe.evaluate.routing import routing_matrix
from flexmoe.experiment.corpora import corpora_dir, corpus_set
from flexmoe.expert.package import build_specialist, load_package
from flexmoe.merge.build import load_merged
from flexmoe.model.checkpoint import moe_layers


class AffineRouter(nn.Module):
    """A fixed router: ``logits = x W' + c`` (no learned parts, no negative-only clamp)."""

    def __init__(self, *, weight: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # (N, H)
        self.register_buffer("offset", offset)  # (N,)

    def forward(self, x: torch.Tensor, *, use_bias: bool) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) + self.offset.to(x.dtype)  # (T, N)


@torch.no_grad()
def token_inputs(
    model: PreTrainedModel, stream: TokenStream, *, seq_len: int = 128, max_total: int = 20_000,
    seed: int = 0,
) -> torch.Tensor:  # fmt: skip
    """``(tokens, layers, hidden)``: the feed-forward inputs of ``max_total`` tokens in blocks
    drawn at random from the packed training stream (not document starts: a Gutenberg text
    starts with its licence)."""
    layers = list(model.model.layers)  # type: ignore[union-attr]
    captured: list[torch.Tensor] = [torch.empty(0)] * len(layers)

    def hook_for(i: int):  # type: ignore[no-untyped-def]
        return lambda module, args: captured.__setitem__(i, args[0])

    handles = [layer.mlp.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    blocks = stream.num_blocks(seq_len)
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = order[: max(1, max_total // seq_len)]
    found = []
    model.eval()
    try:
        for start in range(0, len(chosen), 8):
            batch = stream.batch(chosen[start : start + 8], seq_len)[:, :-1]  # (B, T)
            model(input_ids=batch)
            found.append(torch.stack([h.flatten(0, 1) for h in captured], 1).float())  # (BT,L,H)
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(found)


def shrunk_covariance(x: torch.Tensor, shrink: float) -> torch.Tensor:
    """``(layers, hidden, hidden)`` covariance of ``x (tokens, layers, hidden)``, shrunk toward
    ``trace / hidden * I`` by ``shrink``."""
    x = x.double() - x.double().mean(0)
    cov = torch.einsum("tlh,tlg->lhg", x, x) / (len(x) - 1)
    scale = torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1)  # (L,)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype)
    return (1 - shrink) * cov + shrink * scale[:, None, None] * eye


def gaussian_router(
    means: torch.Tensor, covariance: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``(L, N, H)`` and offsets ``(L, N)`` of the shared-covariance Gaussian router for
    domain means ``(L, N, H)``."""
    means = means.double()
    rows = torch.linalg.solve(covariance, means.transpose(1, 2)).transpose(1, 2)  # (L, N, H)
    offsets = -0.5 * torch.einsum("lnh,lnh->ln", rows, means)  # (L, N)
    return (rows / temperature).float(), (offsets / temperature).float()


@dataclass(frozen=True)
class Recipe:
    name: str
    rows: torch.Tensor  # (L, N, H)
    offsets: torch.Tensor  # (L, N)


def recipes(
    args: argparse.Namespace, specs: dict[str, DataSpec], anchor: Anchor, trained: torch.Tensor
) -> Iterator[Recipe]:
    """Every recipe asked for; ``trained`` are the merged model's own rows ``(L, N, H)``."""
    domains = list(specs)
    wanted = args.recipes.split(",")
    if "trained" in wanted:
        yield Recipe("trained", trained, torch.zeros(trained.shape[:2]))
    gaussian = [w for w in wanted if w.startswith("lda")]
    if not gaussian:
        return
    tokens = args.cache_dir / "tokens"
    streams = {
        d: pack_documents(load_splits([specs[d]]).train, anchor.tokenizer, cache_dir=tokens)
        for d in domains
    }
    inputs = {d: token_inputs(anchor.model, streams[d]) for d in domains}
    covariance = shrunk_covariance(inputs[domains[0]], args.shrink)
    means = {"lda": torch.stack([inputs[d].double().mean(0) for d in domains], 1)}
    if "lda-specialist" in gaussian:
        own = [inputs[domains[0]].double().mean(0)]
        for d in domains[1:]:
            specialist = build_specialist(anchor, load_package(args.run / "experts" / d, anchor))
            own.append(token_inputs(specialist, streams[d]).double().mean(0))
        means["lda-specialist"] = torch.stack(own, 1)
    for name in gaussian:
        for temperature in args.temperatures:
            rows, offsets = gaussian_router(means[name.removesuffix("+trained")], covariance,
                                            temperature)  # fmt: skip
            if name.endswith("+trained"):
                rows = rows + trained
            yield Recipe(f"{name} shrink={args.shrink} T={temperature}", rows, offsets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished demo output directory")
    parser.add_argument("--corpora", default="demo")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "flexmoe")
    parser.add_argument("--recipes", default="trained,lda")
    parser.add_argument("--shrink", type=float, default=0.01)
    parser.add_argument("--temperatures", type=lambda s: [float(t) for t in s.split(",")],
                        default=[1.0, 4.0])  # fmt: skip
    parser.add_argument("--eval-bytes", type=int, default=24_000)
    parser.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args()
    corpora = corpus_set(args.corpora)
    folder = corpora_dir(args.cache_dir, corpora)
    by_name = {
        d.name: DataSpec(domain=d.name, paths=(str(folder / f"{d.name}.jsonl"),), id_field="id")
        for d in corpora.domains
    }
    specs, domains = list(by_name.values()), list(by_name)
    tokens = args.cache_dir / "tokens"
    merged = load_merged(args.run / "merged")
    anchor = load_anchor(args.run / "anchor")
    tokenizer = anchor.tokenizer
    layers = moe_layers(merged)
    trained = torch.stack([m.router.weight.detach().clone() for m in layers])  # (L, N, H)
    for recipe in recipes(args, by_name, anchor, trained):
        started = time.perf_counter()
        for layer, moe in enumerate(layers):
            moe.router = AffineRouter(weight=recipe.rows[layer], offset=recipe.offsets[layer])
            moe.top_k = args.top_k
        scores = evaluate_loaded(
            merged, tokenizer, specs, device=torch.device("cpu"), cache_dir=tokens,
            max_bytes=args.eval_bytes,
        )  # fmt: skip
        bpb = {s.domain: round(s.bits_per_byte, 4) for s in scores}
        shares = routing_matrix(
            merged, tokenizer, specs, domains, device=torch.device("cpu"), cache_dir=tokens,
            max_bytes=args.eval_bytes,
        )  # fmt: skip
        print(json.dumps({
            "recipe": recipe.name, "top_k": args.top_k,
            "average_bpb": round(sum(bpb.values()) / len(bpb), 4), "bpb": bpb,
            "own_share": {d: round(shares[d][d], 3) for d in domains},
            "seconds": round(time.perf_counter() - started, 1),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
