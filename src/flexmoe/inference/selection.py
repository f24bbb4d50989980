"""Expert selection at run time: include or exclude experts by name, owner or license.

An excluded expert's router logit is -inf, so its routing weight is exactly zero and the softmax
renormalises over the rest; the public expert (slot 0) is always active. Selections are masks set
on the MoE layers: changing one needs no reload, and each row of a batch may have its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexmoe.errors import FlexMoEError
from flexmoe.io import read_json
from flexmoe.merge.build import SLOTS_FILE
from flexmoe.model.checkpoint import moe_layers


@dataclass(frozen=True)
class SlotInfo:
    index: int
    name: str
    owner: str
    license: str


def read_slots(model_dir: Path) -> list[SlotInfo]:
    """The slot table of a merged model, in slot order."""
    table = read_json(Path(model_dir) / SLOTS_FILE)
    try:
        return [SlotInfo(s["slot"], s["name"], s["owner"], s["license"]) for s in table["slots"]]
    except (KeyError, TypeError) as e:
        raise FlexMoEError(Path(model_dir) / SLOTS_FILE, f"malformed slot table ({e})") from e


@dataclass(frozen=True)
class Selection:
    """Which experts may answer. Empty ``include`` means all; ``licenses`` empty means any."""

    include: frozenset[str] = field(default_factory=frozenset)  # names or owners
    exclude: frozenset[str] = field(default_factory=frozenset)  # names or owners
    licenses: frozenset[str] = field(default_factory=frozenset)  # allowed license ids

    def mask(self, slots: list[SlotInfo]) -> torch.Tensor:
        """``(N,)`` bool, True = active. Unknown names are an error; slot 0 is always active."""
        known = {s.name for s in slots} | {s.owner for s in slots}
        unknown = sorted((self.include | self.exclude) - known)
        if unknown:
            raise FlexMoEError(
                "--exclude/--include", f"unknown expert or owner: {', '.join(unknown)}"
            )
        active = []
        for slot in slots:
            keys = {slot.name, slot.owner}
            ok = (not self.include or bool(keys & self.include)) and not keys & self.exclude
            ok = ok and (not self.licenses or slot.license in self.licenses)
            active.append(slot.index == 0 or ok)
        return torch.tensor(active, dtype=torch.bool)


def set_expert_mask(model: torch.nn.Module, mask: torch.Tensor | None) -> None:
    """Apply ``(N,)`` or ``(B, N)`` masks to every MoE layer (None: all experts active)."""
    for layer in moe_layers(model):
        if mask is not None and mask.shape[-1] != layer.num_experts:
            raise FlexMoEError(
                None, f"mask has {mask.shape[-1]} experts, model has {layer.num_experts}"
            )
        layer.expert_mask = mask
