"""An owner's model as it was trained, built from its package: the anchor's public expert, the
owner's expert and the coordinator's rivals it trained against (the package format itself is
:mod:`flexmoe.expert.package`; this module builds models from it)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import FlexOlmoForCausalLM

from flexmoe.anchor import Anchor
from flexmoe.errors import FlexMoEError
from flexmoe.expert.manifest import MANIFEST_FILE, RIVALS_DIR
from flexmoe.expert.package import (
    PKG_BIAS,
    PKG_PROJ,
    PKG_ROUTER,
    ExpertPackage,
    load_package,
    rival_mismatch,
    rival_version,
)
from flexmoe.model import names
from flexmoe.model.checkpoint import moe_layers, upcycle


def trained_rivals(anchor: Anchor, package: ExpertPackage) -> list[ExpertPackage]:
    """The coordinator's rival packages ``package`` was trained against (its manifest names
    them and their versions), read from the anchor's ``rivals/`` folder."""
    paths = [Path(anchor.path) / RIVALS_DIR / r.name for r in package.manifest.training.rivals]
    for path in paths:
        if not (path / MANIFEST_FILE).is_file():
            raise FlexMoEError(
                package.path,
                f"trained against the rival {path.name!r}, which the anchor does not ship",
            )
    rivals = [load_package(path, anchor) for path in paths]
    versions = {r.manifest.name: rival_version(r.manifest_sha256) for r in rivals}
    why = rival_mismatch(package.manifest, versions) if rivals else None
    if why is not None:
        raise FlexMoEError(package.path, why)
    return rivals


def build_specialist(
    anchor: Anchor, package: ExpertPackage, *, use_bias: bool = True
) -> FlexOlmoForCausalLM:
    """The owner's model as it was trained: the anchor (slot 0) plus this expert (slot 1),
    top-2 of 2; or, for an expert trained against the coordinator's rivals, those as slots
    2.. at the top-k it was trained at."""
    rivals = trained_rivals(anchor, package)
    count = 2 + len(rivals)
    trained_k = package.manifest.training.rival_top_k or 2
    model = upcycle(anchor.model, num_experts=count, top_k=min(count, max(2, trained_k)))
    with torch.no_grad():
        for layer, moe in enumerate(moe_layers(model)):
            moe.use_bias = use_bias
            moe.router.rows[0].copy_(anchor.public_router[layer])
            for slot, member in enumerate([package, *rivals], start=1):
                moe.router.rows[slot].copy_(member.tensors[PKG_ROUTER.format(layer=layer)])
                moe.router.biases[slot - 1].copy_(member.tensors[PKG_BIAS.format(layer=layer)])
                for proj in names.PROJECTIONS:
                    getattr(moe.experts[slot], proj).weight.copy_(
                        member.tensors[PKG_PROJ.format(layer=layer, proj=proj)]
                    )
    return model.eval()
