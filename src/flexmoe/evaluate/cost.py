"""What each scored model costs at inference: forward FLOPs per token, relative to the anchor.

Counted: every matrix multiply a token goes through (2 FLOPs per multiply-add): the attention
projections, the attention scores and their weighted sum over the mean context of a scored
block, each feed-forward the token visits, the router, the output layer; and for an ensemble,
every member it runs plus the mixing of their distributions. Embedding lookups, norms and
softmaxes are left out (a few per cent at these sizes, the same for every model).

- ``anchor``, ``soup``, ``fedavg``: one dense model.
- ``specialist:X``: the anchor with two feed-forwards, both visited (top-2 of 2) and a router;
  trained against the coordinator's ``R`` rivals, ``2 + R`` feed-forwards at the merge's top-k.
- ``flexmoe`` and its variants: ``top_k`` feed-forwards of ``N + R + 1`` and a router over
  them; ``unrestricted``: of ``N + 1``.
- ``btm``: every owner's specialist over the whole context (the posterior needs each member's
  likelihood of the prefix), then a log-softmax per member and the top-2 mixture.
- ``seq-route``: the anchor once over the document (its mean hidden state picks the member),
  then one specialist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flexmoe.evaluate.registry import Base, Variant

BTM_MIXED = 2  # members whose distributions btm mixes (evaluate.baselines.BTM_TOP_K)


@dataclass(frozen=True)
class Shape:
    """The sizes that decide a forward pass's FLOPs per token."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: float  # mean number of earlier tokens a token attends to

    @classmethod
    def of(cls, config: Any, *, seq_len: int) -> Shape:
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(
            hidden=int(config.hidden_size),
            intermediate=int(config.intermediate_size),
            layers=int(config.num_hidden_layers),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=head_dim,
            vocab=int(config.vocab_size),
            context=(seq_len + 1) / 2,
        )

    def forward(self, *, ffns: int = 1, router_rows: int = 0) -> float:
        """FLOPs per token of one model that visits ``ffns`` feed-forwards per layer and scores
        ``router_rows`` router rows."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        projections = 2 * self.hidden * (2 * q + 2 * kv)  # q, o; k, v
        attention = 2 * 2 * q * self.context  # scores and the weighted sum
        ffn = 2 * 3 * self.hidden * self.intermediate
        router = 2 * self.hidden * router_rows
        per_layer = projections + attention + ffns * ffn + router
        return self.layers * per_layer + 2 * self.hidden * self.vocab


def relative_cost(name: str, shape: Shape, *, owners: int, top_k: int, rivals: int = 0) -> float:
    """Inference FLOPs per token of the model registered as ``name``, in anchors; ``owners``
    experts besides the public one and ``rivals`` public rivals (in the merged model and in
    every owner's), ``top_k`` the merged model's own."""
    variant = Variant.parse(name)
    anchor = shape.forward()
    members = 2 + rivals  # the public expert, the owner's, the rivals it was trained against
    specialist = shape.forward(ffns=min(members, max(2, top_k)), router_rows=members)
    if variant.base in (Base.ANCHOR, Base.SOUP, Base.FEDAVG):
        flops = anchor
    elif variant.base == Base.SPECIALIST:
        flops = specialist
    elif variant.base == Base.BTM:
        mixing = owners * 2 * shape.vocab + BTM_MIXED * 2 * shape.vocab
        flops = owners * specialist + mixing
    elif variant.base == Base.SEQ_ROUTE:
        flops = anchor + specialist
    else:  # the merged model, its variants and router versions; unrestricted has no rivals
        slots = owners + 1 + (0 if variant.base == Base.UNRESTRICTED else rivals)
        flops = shape.forward(ffns=min(variant.top_k or top_k, slots), router_rows=slots)
    return flops / anchor
