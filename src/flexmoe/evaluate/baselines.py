"""Baselines built from the same anchor and expert packages as the merged model (paper Tables 1-2).

Each has a registry name: ``anchor`` (the public model alone), ``specialist:NAME`` (one owner's
2-expert model), ``soup`` (the anchor with its MLP replaced by the uniform average of every
expert's FFN, the public one included) and ``flexmoe`` (the merged model).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel

from flexmoe.anchor import Anchor
from flexmoe.errors import FlexMoEError
from flexmoe.expert.package import PKG_PROJ, ExpertPackage, build_specialist
from flexmoe.merge.build import load_merged
from flexmoe.model import names
from flexmoe.model.checkpoint import build_dense


def soup(anchor: Anchor, packages: list[ExpertPackage]) -> PreTrainedModel:
    """The anchor whose MLP in every layer is the mean of the public and the owners' FFNs."""
    state = {k: v.clone() for k, v in anchor.model.state_dict().items()}
    for layer in range(anchor.model.config.num_hidden_layers):
        for proj in names.PROJECTIONS:
            key = names.DENSE_MLP.format(layer=layer, proj=proj)
            members = [state[key]] + [
                p.tensors[PKG_PROJ.format(layer=layer, proj=proj)] for p in packages
            ]
            state[key] = torch.stack(members).mean(0)
    return build_dense(anchor.model.config, state, where=Path("<soup>"))


def baseline_names(packages: list[ExpertPackage]) -> list[str]:
    """Every registry name buildable from these packages, in report order."""
    return [
        "anchor",
        *(f"specialist:{p.manifest.name}" for p in packages),
        "soup",
        "flexmoe",
    ]


def build_baseline(
    name: str, *, anchor: Anchor, packages: list[ExpertPackage], merged_dir: Path | None = None
) -> PreTrainedModel:
    """The model registered as ``name``; ``flexmoe`` needs the merged model's directory."""
    by_name = {p.manifest.name: p for p in packages}
    builders: dict[str, Callable[[], PreTrainedModel]] = {
        "anchor": lambda: anchor.model,
        "soup": lambda: soup(anchor, packages),
    }
    if merged_dir is not None:
        builders["flexmoe"] = lambda: load_merged(merged_dir)
    if name.startswith("specialist:"):
        package = by_name.get(name.removeprefix("specialist:"))
        if package is None:
            raise FlexMoEError(name, f"no such expert (experts: {', '.join(by_name)})")
        return build_specialist(anchor, package)  # as its owner trained and scored it
    if name not in builders:
        raise FlexMoEError(
            name, f"unknown baseline; choose from {', '.join(baseline_names(packages))}"
        )
    return builders[name]()
