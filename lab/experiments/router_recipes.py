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
  keep each owner's own public-vs-expert split; the Gaussian part says whose text it is);
- ``calibrated``: the coordinator's lever, public text and packages only. Per layer, expert k's
  margin over the public expert, ``m_k = (r_k - r_0) . h``, is measured on public training text
  in the anchor (mean mu_k, spread sigma_k). Its row becomes ``r_0 + (r_k - r_0) s / sigma_k``
  (s: the median spread), so that one unit of margin means as much for every expert, and with
  ``--thresholds t`` its offset ``-s (mu_k / sigma_k + t)`` (kept <= 0, as the owners' negative
  bias can hold it): expert k competes once its margin is t spreads above its public average;
- ``ceiling``: NOT a recipe. The rows and offsets fitted by gradient descent on the language
  modelling loss of the very held-out text that is scored, every expert frozen. No router of
  this shape, private or not, should do better with these experts: it bounds every lever that
  changes only the router.

Usage (after ``flexmoe-lab demo --out RUN [--corpora NAME]``):

    python lab/experiments/router_recipes.py RUN --corpora demo --recipes trained,lda
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
from flexmoe.evaluate.perplexity import eval_documents, evaluate_loaded
from flexmoe.evaluate.routing import routing_matrix
from flexmoe.expert.package import load_package
from flexmoe.expert.specialist import build_specialist
from flexmoe.merge.layout import load_merged
from flexmoe.model.checkpoint import moe_layers
from flexmoe_lab.corpora import corpora_dir, corpus_set
from flexmoe_lab.levers import calibrated_rows, ffn_inputs


class AffineRouter(nn.Module):
    """A fixed router: ``logits = x W' + c`` (no learned parts, no negative-only clamp)."""

    def __init__(self, *, weight: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # (N, H)
        self.register_buffer("offset", offset)  # (N,)

    def forward(self, x: torch.Tensor, *, use_bias: bool) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) + self.offset.to(x.dtype)  # (T, N)


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


def calibrated_router(
    trained: torch.Tensor, public: torch.Tensor, threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibrated rows (:func:`flexmoe_lab.levers.calibrated_rows`) and, with a
    ``threshold``, offsets so that each owner starts competing ``threshold`` spreads above its
    mean margin on public tokens (kept <= 0, as the owners' negative bias can hold them)."""
    rows = calibrated_rows(trained, public)
    offsets = torch.zeros(trained.shape[:2])
    if threshold is not None:
        margins = torch.einsum("tlh,lnh->tln", public, rows[:, 1:] - rows[:, :1])  # (T, L, N-1)
        shift = -(margins.mean(0) + threshold * margins.std(0))
        offsets[:, 1:] = shift.clamp(max=0)
    return rows, offsets


def fit_ceiling(
    model: PreTrainedModel,
    streams: list[TokenStream],
    trained: torch.Tensor,
    *,
    steps: int,
    seq_len: int = 128,
    batch: int = 8,
    lr: float = 1e-2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and offsets fitted on the language-modelling loss of ``streams`` with everything
    else frozen (the measurement's upper bound, see the module's docstring)."""
    layers = moe_layers(model)
    rows = nn.Parameter(trained.clone())
    offsets = nn.Parameter(torch.zeros(trained.shape[:2]))
    for param in model.parameters():
        param.requires_grad_(False)
    for layer, moe in enumerate(layers):
        moe.router = _Slice(rows, offsets, layer)
    blocks = [(i, b) for i, s in enumerate(streams) for b in range(s.num_blocks(seq_len))]
    rng = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam([rows, offsets], lr=lr)
    model.train()
    for _ in range(steps):
        picked = [blocks[int(j)] for j in torch.randint(len(blocks), (batch,), generator=rng)]
        ids = torch.cat([streams[i].batch([b], seq_len) for i, b in picked])
        logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return rows.detach().clone(), offsets.detach().clone()


class _Slice(nn.Module):
    """Layer ``layer``'s view of shared trainable rows and offsets."""

    def __init__(self, rows: nn.Parameter, offsets: nn.Parameter, layer: int) -> None:
        super().__init__()
        self.rows, self.offsets, self.layer = rows, offsets, layer

    def forward(self, x: torch.Tensor, *, use_bias: bool) -> torch.Tensor:
        return F.linear(x, self.rows[self.layer]) + self.offsets[self.layer]


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
    tokens = args.cache_dir / "tokens"
    if "calibrated" in wanted:
        public_stream = pack_documents(
            load_splits([specs[domains[0]]]).train, anchor.tokenizer, cache_dir=tokens
        )
        public = ffn_inputs(anchor.model, public_stream)
        for threshold in [None, *args.thresholds]:
            rows, offsets = calibrated_router(trained, public, threshold)
            yield Recipe(f"calibrated threshold={threshold}", rows, offsets)
    gaussian = [w for w in wanted if w.startswith("lda")]
    if not gaussian:
        return
    streams = {
        d: pack_documents(load_splits([specs[d]]).train, anchor.tokenizer, cache_dir=tokens)
        for d in domains
    }
    inputs = {d: ffn_inputs(anchor.model, streams[d]) for d in domains}
    covariance = shrunk_covariance(inputs[domains[0]], args.shrink)
    means = {"lda": torch.stack([inputs[d].double().mean(0) for d in domains], 1)}
    if "lda-specialist" in gaussian:
        own = [inputs[domains[0]].double().mean(0)]
        for d in domains[1:]:
            specialist = build_specialist(anchor, load_package(args.run / "experts" / d, anchor))
            own.append(ffn_inputs(specialist, streams[d]).double().mean(0))
        means["lda-specialist"] = torch.stack(own, 1)
    for name in gaussian:
        for temperature in args.temperatures:
            rows, offsets = gaussian_router(
                means[name.removesuffix("+trained")], covariance, temperature
            )
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
    parser.add_argument(
        "--temperatures", type=lambda s: [float(t) for t in s.split(",")], default=[1.0, 4.0]
    )
    parser.add_argument(
        "--thresholds", type=lambda s: [float(t) for t in s.split(",")], default=[0.0, 1.0, 2.0]
    )
    parser.add_argument("--ceiling-steps", type=int, default=300)
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
    chosen = list(recipes(args, by_name, anchor, trained))
    if "ceiling" in args.recipes.split(","):
        held_out = [
            pack_documents(
                eval_documents(spec, max_bytes=args.eval_bytes), tokenizer, cache_dir=tokens
            )
            for spec in specs
        ]
        for layer in layers:
            layer.top_k = args.top_k
        rows, offsets = fit_ceiling(merged, held_out, trained, steps=args.ceiling_steps)
        chosen.append(Recipe(f"ceiling steps={args.ceiling_steps}", rows, offsets))
    for recipe in chosen:
        started = time.perf_counter()
        for layer, moe in enumerate(layers):
            moe.router = AffineRouter(weight=recipe.rows[layer], offset=recipe.offsets[layer])
            moe.top_k = args.top_k
        scores = evaluate_loaded(
            merged,
            tokenizer,
            specs,
            device=torch.device("cpu"),
            cache_dir=tokens,
            max_bytes=args.eval_bytes,
        )
        bpb = {s.domain: round(s.bits_per_byte, 4) for s in scores}
        shares = routing_matrix(
            merged,
            tokenizer,
            specs,
            domains,
            device=torch.device("cpu"),
            cache_dir=tokens,
            max_bytes=args.eval_bytes,
        )
        print(
            json.dumps(
                {
                    "recipe": recipe.name,
                    "top_k": args.top_k,
                    "average_bpb": round(sum(bpb.values()) / len(bpb), 4),
                    "bpb": bpb,
                    "own_share": {d: round(shares[d][d], 3) for d in domains},
                    "seconds": round(time.perf_counter() - started, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
