"""Expert selection at run time: include or exclude experts by name, owner or license.

An excluded expert's router logit is -inf, so its routing weight is exactly zero and the softmax
renormalises over the rest; the public expert (slot 0) is always active, even where its owner's
other experts are excluded (docs/serving.md). Selections are masks set on the MoE layers:
changing one needs no reload, and each row of a batch may have its own.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from flexmoe.errors import FlexMoEError
from flexmoe.merge.layout import APPLY_BIAS, MergedModel
from flexmoe.merge.slots import SlotInfo
from flexmoe.merge.standing import standing_exclusions
from flexmoe.model.checkpoint import load_model, moe_layers
from flexmoe.model.moe import MoEFeedForward


@dataclass(frozen=True)
class Selection:
    """Which experts may answer. Empty ``include`` means all; ``licenses`` empty means any."""

    include: frozenset[str] = field(default_factory=frozenset)  # names or owners
    exclude: frozenset[str] = field(default_factory=frozenset)  # names or owners
    licenses: frozenset[str] = field(default_factory=frozenset)  # allowed license ids
    opted_out: frozenset[str] = field(default_factory=frozenset)  # the owners' standing choice

    def mask(self, slots: list[SlotInfo]) -> torch.Tensor:
        """``(N,)`` bool, True = active. Slot 0, the public expert, is always active: excluding
        it by name is an error, excluding its owner (the coordinator) leaves out that owner's
        other experts (the public rivals) and keeps it. Unknown names, and a choice that leaves
        no expert but the public one, are errors (opt-outs alone may do that)."""
        known = {s.name for s in slots} | {s.owner for s in slots}
        unknown = sorted((self.include | self.exclude) - known)
        if unknown:
            raise FlexMoEError(
                "--exclude/--include", f"unknown expert or owner: {', '.join(unknown)}"
            )
        public = slots[0]
        if public.name in self.exclude:
            raise FlexMoEError(
                "--exclude",
                f"the public expert {public.name!r} is always active (excluding its owner, "
                f"{public.owner!r}, leaves out that owner's other experts)",
            )
        chosen = []
        for slot in slots:
            keys = {slot.name, slot.owner}
            ok = (not self.include or bool(keys & self.include)) and not keys & self.exclude
            chosen.append(ok and (not self.licenses or slot.license in self.licenses))
        if (
            len(slots) > 1
            and (self.include or self.exclude or self.licenses)
            and not any(chosen[1:])
        ):
            raise FlexMoEError(
                "--exclude/--include/--license", "the selection excludes every owner's expert"
            )
        active = [
            slot.index == 0 or (ok and slot.name not in self.opted_out)
            for slot, ok in zip(slots, chosen, strict=True)
        ]
        return torch.tensor(active, dtype=torch.bool)


def current_mask(model_dir: Path, slots: list[SlotInfo], selection: Selection) -> torch.Tensor:
    """The mask for ``selection`` on top of the owners' standing choice, read now."""
    return replace(selection, opted_out=standing_exclusions(model_dir, slots)).mask(slots)


def load_selected(
    model_dir: Path, selection: Selection | None = None, *, use_bias: bool = APPLY_BIAS
) -> torch.nn.Module:
    """Any checkpoint directory as a runtime model. A merged model runs the experts that
    ``selection`` and the owners' standing choice (read now) leave active."""
    if not MergedModel.is_merged(model_dir):
        if selection is not None:
            raise FlexMoEError(model_dir, "expert selection needs a merged model")
        return load_model(model_dir)
    merged = MergedModel(Path(model_dir))
    model = merged.load(use_bias=use_bias)
    set_expert_mask(model, current_mask(model_dir, merged.slots(), selection or Selection()))
    return model


_LAYERS: weakref.WeakKeyDictionary[torch.nn.Module, list[MoEFeedForward]] = (
    weakref.WeakKeyDictionary()
)


def set_expert_mask(model: torch.nn.Module, mask: torch.Tensor | None) -> None:
    """Apply ``(N,)`` or ``(B, N)`` masks to every MoE layer (None: all experts active).

    The model's MoE layers are found once and remembered, so a change costs microseconds.
    """
    layers = _LAYERS.get(model)
    if layers is None:
        layers = _LAYERS[model] = moe_layers(model)
    for layer in layers:
        if mask is not None and mask.shape[-1] != layer.num_experts:
            raise FlexMoEError(
                None, f"mask has {mask.shape[-1]} experts, model has {layer.num_experts}"
            )
        layer.expert_mask = mask
