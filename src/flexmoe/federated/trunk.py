"""The shared trunk of a merged model, and how the coordinator applies the owners' change to it.

The trunk is every parameter that all owners share and that no single owner's text or weights
own: attention (q/k/v/o and their norms), the layer norms and the final norm, the public expert
(slot 0) and the coordinator's rival experts. The embeddings and the output layer stay frozen
(the anchor's vocabulary, and most of a small model's parameters); each owner's own expert is
its slot, and the router rows are versioned apart (``router-vN``), though a trunk phase trains
them too.

In a trunk phase each owner trains the trunk and every active router row on its own text plus
the public share, for a few local steps, and sends the change (in full, or as low-rank factors:
:class:`LowRank`). The coordinator averages the changes, weighted by tokens, and treats the
average as a pseudo-gradient for a server optimiser (:class:`ServerOptimizer`, FedOpt: Reddi et
al., "Adaptive Federated Optimization", ICLR 2021), whose state is kept with each trunk version
so that a rebuild after an opt-out continues exactly.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from flexmoe.errors import FlexMoEError
from flexmoe.expert.rivals import RIVAL_OWNER
from flexmoe.merge.slots import SlotTable

_EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(\d+)\.\w+\.weight")
_FROZEN_PREFIXES = ("model.embed_tokens.", "lm_head.")
ROWS = "rows"  # the router rows' entry in an update of the trunk


def shared_slots(table: SlotTable) -> list[int]:
    """The slots every owner shares: the public expert and the coordinator's rivals."""
    return [0, *(s.slot for s in table.slots[1:] if s.owner == RIVAL_OWNER)]


EMBEDDINGS = ("none", "output", "all")  # which of the vocabulary's tensors the trunk holds


def embeddings_in(keys: Iterable[str]) -> str:
    """Which of the vocabulary's tensors a stored trunk holds: none, output or all."""
    held = set(keys)
    if any(k.startswith("model.embed_tokens.") for k in held):
        return "all"
    return "output" if any(k.startswith("lm_head.") for k in held) else "none"


def trunk_keys(names: Iterable[str], table: SlotTable, *, embeddings: str = "none") -> list[str]:
    """The trunk's tensors among ``names`` (runtime or on-disk names: they agree outside the
    router), sorted. ``embeddings``: ``output`` adds the output layer, ``all`` the input
    embeddings too (whose update, seen alone, tells which tokens an owner's batch held)."""
    if embeddings not in EMBEDDINGS:
        raise FlexMoEError("--trunk-embeddings", f"must be one of {', '.join(EMBEDDINGS)}")
    kept = {"none": (), "output": ("lm_head.",), "all": _FROZEN_PREFIXES}[embeddings]
    shared = set(shared_slots(table))
    keys = []
    for name in names:
        if ".mlp.router." in name or ".mlp.gate." in name:
            continue
        if name.startswith(_FROZEN_PREFIXES) and not name.startswith(kept):
            continue
        expert = _EXPERT.fullmatch(name)
        if expert is not None and int(expert.group(1)) not in shared:
            continue
        keys.append(name)
    return sorted(keys)


# --- low-rank updates -------------------------------------------------------------------------


@dataclass(frozen=True)
class LowRank:
    """Rank-``rank`` updates of the trunk's matrices with a frozen random ``A``: each owner
    trains only ``B`` (``out x rank``, from zero) of ``W + B @ A``, and sends it. ``A`` is drawn
    from the round and the tensor's name alone, the same at every owner and at the coordinator,
    so the average of the owners' ``B @ A`` is ``mean(B) @ A`` exactly (FFA-LoRA: Sun et al.,
    "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024) and secure aggregation
    of the factors gives the same model as of the products. Vectors (norms, router rows) are
    trained and sent in full."""

    rank: int
    round: int
    seed: int = 0

    def factor(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """``A`` of the matrix ``key`` of ``shape`` (out, in): ``(rank, in)``, entries of
        standard deviation ``1 / sqrt(rank)`` so that a step of ``B`` moves ``W`` as much as a
        step of ``W`` itself would."""
        seed = zlib.crc32(f"{self.seed}:{self.round}:{key}".encode())
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((self.rank, shape[1]), generator=generator) / self.rank**0.5

    def applies(self, tensor: torch.Tensor) -> bool:
        return tensor.dim() == 2 and min(tensor.shape) > self.rank

    def dense(self, key: str, sent: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The change of ``key`` that ``sent`` (``B``, or the change itself) stands for."""
        if len(shape) == 2 and min(shape) > self.rank:
            if tuple(sent.shape) != (shape[0], self.rank):
                raise FlexMoEError(key, f"a low-rank factor of shape {tuple(sent.shape)}")
            return sent.float() @ self.factor(key, shape)
        return sent.float()


class LowRankDelta(nn.Module):
    """``W + B @ A`` as a parametrization of a frozen ``W`` (``torch.nn.utils.parametrize``)."""

    def __init__(self, factor: torch.Tensor, out_features: int) -> None:
        super().__init__()
        self.factor: torch.Tensor
        self.register_buffer("factor", factor)  # (rank, in)
        self.low = nn.Parameter(torch.zeros(out_features, factor.shape[0]))  # (out, rank)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.low @ self.factor).to(weight.dtype)
