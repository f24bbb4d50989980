"""Baselines built from the same anchor and expert packages as the merged model (paper Tables 1-2).

Registry names:

- ``anchor``: the public model alone;
- ``specialist:NAME``: one owner's own model, as its owner trained and scored it;
- ``soup``: the anchor with its MLP replaced by the uniform average of every expert's FFN (the
  public one included);
- ``btm``: Branch-Train-Merge: the specialists' next-token distributions mixed by the posterior
  of each specialist given the context so far (uniform prior), the top-2 members only;
- ``seq-route``: each document sent as a whole to the anchor or the specialist whose router rows
  (the domain embeddings) are nearest to the document's mean hidden state;
- ``unrestricted``: an MoE of the merged model's shape trained on all the data at once (see
  :mod:`flexmoe.expert.unrestricted`; needs its directory);
- ``flexmoe``: the merged model, and its variants ``flexmoe:top-K``, ``flexmoe:bias``,
  ``flexmoe:without-NAME`` and ``flexmoe:prefix-P`` (document-level routing; options joined
  by ``:``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from flexmoe.anchor import Anchor
from flexmoe.errors import FlexMoEError
from flexmoe.evaluate.perplexity import DocumentRouted, Scoreable
from flexmoe.evaluate.registry import (
    ANCHOR,
    BTM,
    FLEXMOE,
    SEQ_ROUTE,
    SOUP,
    UNRESTRICTED,
    Base,
    Variant,
    specialist,
)
from flexmoe.expert.manifest import PKG_PROJ, PKG_ROUTER
from flexmoe.expert.package import ExpertPackage
from flexmoe.expert.specialist import build_specialist
from flexmoe.inference.selection import Selection, load_selected
from flexmoe.merge.layout import APPLY_BIAS
from flexmoe.model import names
from flexmoe.model.checkpoint import build_dense, load_model, moe_layers
from flexmoe.model.probe import document_ffn_inputs, unit_rows

BTM_TOP_K = 2


def soup(anchor: Anchor, packages: list[ExpertPackage]) -> PreTrainedModel:
    """The anchor whose MLP in every layer is the mean of the public and the owners' FFNs."""
    state = {k: v.clone() for k, v in anchor.model.state_dict().items()}
    for layer in range(anchor.model.config.num_hidden_layers):
        for proj in names.PROJECTIONS:
            key = names.DENSE_MLP.format(layer=layer, proj=proj)
            members = [state[key]] + [  # packages load on the CPU; the anchor may not
                p.tensors[PKG_PROJ.format(layer=layer, proj=proj)].to(state[key]) for p in packages
            ]
            state[key] = torch.stack(members).float().mean(0).to(state[key].dtype)
    return build_dense(anchor.model.config, state, where=Path("<soup>"))


class PosteriorEnsemble(nn.Module):
    """Branch-Train-Merge inference: ``p(x_t+1 | x_<=t) = sum_d p(d | x_<=t) p_d(x_t+1 | x_<=t)``.

    ``p(d | x_<=t)`` is proportional to the likelihood each member gave the tokens it has already
    seen in this sequence (a uniform prior at the first position); only the ``top_k`` most
    probable members are mixed, their posteriors renormalised. ``logits`` are log-probabilities.
    """

    def __init__(self, members: list[nn.Module], *, top_k: int = BTM_TOP_K) -> None:
        super().__init__()
        if not members:
            raise FlexMoEError(None, "an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.top_k = min(top_k, len(members))
        self.config = members[0].config  # type: ignore[union-attr]

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> CausalLMOutput:
        logps = torch.stack(
            [F.log_softmax(m(input_ids=input_ids).logits.float(), dim=-1) for m in self.members]
        )  # (M, B, L, V)
        count, batch, _, vocab = logps.shape
        seen = logps[:, :, :-1].gather(-1, input_ids[None, :, 1:, None].expand(count, -1, -1, 1))[
            ..., 0
        ]  # (M, B, L-1): log p_d of each next token that is already in the context
        context = torch.cat([logps.new_zeros(count, batch, 1), seen.cumsum(-1)], dim=-1)  # (M,B,L)
        top_ll, top_i = context.topk(self.top_k, dim=0)  # (K, B, L)
        weights = torch.log_softmax(top_ll, dim=0)  # (K, B, L)
        chosen = logps.gather(0, top_i[..., None].expand(-1, -1, -1, vocab))  # (K, B, L, V)
        return CausalLMOutput(logits=torch.logsumexp(weights[..., None] + chosen, dim=0))


@dataclass(frozen=True)
class NearestDomain:
    """Sends each text to the member whose per-layer router rows are nearest (cosine, averaged
    over layers) to the text's mean feed-forward input in the anchor."""

    anchor: Anchor
    rows: torch.Tensor  # (members, layers, hidden), unit length
    device: torch.device

    def __call__(self, texts: list[str]) -> list[int]:
        docs = document_ffn_inputs(
            self.anchor.model, self.anchor.tokenizer, texts, device=self.device
        )  # (D, layers, hidden)
        similarity = torch.einsum("dlh,mlh->dml", unit_rows(docs), self.rows).mean(-1)  # (D, M)
        return [int(i) for i in similarity.argmax(-1)]


def seq_route(
    anchor: Anchor, packages: list[ExpertPackage], device: torch.device
) -> DocumentRouted:
    """The anchor (public row r_0) and each owner's specialist (its row r_k), one per document."""
    layers = anchor.model.config.num_hidden_layers
    owner_rows = [
        torch.stack([p.tensors[PKG_ROUTER.format(layer=layer)] for layer in range(layers)])
        for p in packages
    ]  # each (layers, hidden)
    rows = unit_rows(torch.stack([anchor.public_router, *owner_rows]).float())
    return DocumentRouted(
        members=[anchor.model, *(build_specialist(anchor, p) for p in packages)],
        route=NearestDomain(anchor, rows, device),
    )


def merged_variant(merged_dir: Path, variant: Variant) -> nn.Module:
    """The merged model at ``merged_dir`` with ``variant``'s top-k, biases and experts left out
    (the owners' standing opt-outs are honoured too)."""
    use_bias = APPLY_BIAS if variant.bias is None else variant.bias
    selection = Selection(exclude=frozenset(variant.without))
    model = load_selected(merged_dir, selection, use_bias=use_bias)
    if variant.top_k is not None:
        layers = moe_layers(model)
        if variant.top_k > layers[0].num_experts:
            raise FlexMoEError(variant.name(), f"top-k must be in 1..{layers[0].num_experts}")
        for layer in layers:
            layer.top_k = variant.top_k
    if variant.prefix is not None:
        for layer in moe_layers(model):
            layer.prefix_mix = variant.prefix / 100
    return model


def baseline_names(packages: list[ExpertPackage], *, unrestricted: bool = False) -> list[str]:
    """Every registry name buildable from these packages (and a merged model), in report order."""
    return [
        ANCHOR,
        *(specialist(p.manifest.name) for p in packages),
        SOUP,
        BTM,
        SEQ_ROUTE,
        *([UNRESTRICTED] if unrestricted else []),
        FLEXMOE,
    ]


def build_baseline(
    name: str,
    *,
    anchor: Anchor,
    packages: list[ExpertPackage],
    device: torch.device,
    merged_dir: Path | None = None,
    unrestricted_dir: Path | None = None,
) -> Scoreable:
    """The model registered as ``name``. ``flexmoe`` and its variants need the merged model's
    directory, ``unrestricted`` the jointly trained model's."""
    variant = Variant.parse(name)
    if variant.base == Base.SPECIALIST:
        by_name = {p.manifest.name: p for p in packages}
        package = by_name.get(str(variant.expert))
        if package is None:
            raise FlexMoEError(name, f"no such expert (experts: {', '.join(by_name)})")
        return build_specialist(anchor, package)
    if variant.base == Base.FLEXMOE:
        if merged_dir is None or variant.router is not None:
            raise FlexMoEError(name, "needs the merged model's directory")
        return merged_variant(merged_dir, variant)
    if variant.base == Base.FEDAVG:
        raise FlexMoEError(name, "needs the fedavg model's directory (flexmoe baseline fedavg)")
    if variant.base == Base.UNRESTRICTED:
        if unrestricted_dir is None:
            raise FlexMoEError(name, "unknown baseline without the unrestricted model's directory")
        return load_model(unrestricted_dir)
    builders: dict[Base, Callable[[], Scoreable]] = {
        Base.ANCHOR: lambda: anchor.model,
        Base.SOUP: lambda: soup(anchor, packages),
        Base.BTM: lambda: PosteriorEnsemble([build_specialist(anchor, p) for p in packages]),
        Base.SEQ_ROUTE: lambda: seq_route(anchor, packages, device),
    }
    return builders[variant.base]()
