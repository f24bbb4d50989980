"""Baselines from the same anchor and packages: registry names, the soup's weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flexmoe.anchor import load_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.errors import FlexMoEError
from flexmoe.evaluate.baselines import baseline_names, build_baseline
from flexmoe.expert.package import PKG_PROJ, load_package
from flexmoe.expert.train import EXPERT_DEFAULTS, ExpertIdentity, train_expert
from flexmoe.merge.build import build_merged
from flexmoe.merge.plan import plan_merge

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def package_dirs(
    tmp_path_factory: pytest.TempPathFactory, anchor_dir: Path, corpus_dir: Path
) -> list[Path]:
    root = tmp_path_factory.mktemp("baseline-packages")
    cfg = replace(EXPERT_DEFAULTS, steps=4, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1,
                  eval_every=0, checkpoint_every=0)  # fmt: skip
    for name, files in (("upper", "other.jsonl"), ("again", "public.jsonl")):
        train_expert(
            anchor_dir=anchor_dir, data=[DataSpec(name, (str(corpus_dir / files),))],
            identity=ExpertIdentity(name=name, owner=f"{name} org", license="MIT"),
            out=root / name, cfg=cfg, device=CPU, cache_dir=None, progress=False,
        )  # fmt: skip
    return [root / "upper", root / "again"]


def test_registry_and_soup(anchor_dir: Path, package_dirs: list[Path], tmp_path: Path) -> None:
    anchor = load_anchor(anchor_dir)
    packages = [load_package(p, anchor) for p in package_dirs]
    assert baseline_names(packages) == [
        "anchor", "specialist:upper", "specialist:again", "soup", "flexmoe"
    ]  # fmt: skip
    soup = build_baseline("soup", anchor=anchor, packages=packages)
    key = "model.layers.1.mlp.up_proj.weight"
    want = torch.stack([
        anchor.model.state_dict()[key],
        packages[0].tensors[PKG_PROJ.format(layer=1, proj="up_proj")],
        packages[1].tensors[PKG_PROJ.format(layer=1, proj="up_proj")],
    ]).mean(0)  # fmt: skip
    assert torch.allclose(soup.state_dict()[key], want)
    same = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(soup.state_dict()[same], anchor.model.state_dict()[same])
    ids = torch.randint(2, 300, (1, 8))
    with torch.no_grad():
        assert (
            build_baseline("specialist:upper", anchor=anchor, packages=packages)(ids).logits.shape[
                -1
            ]
            > 0
        )
    build_merged(plan_merge(anchor_dir, package_dirs, top_k=2), tmp_path / "m", progress=False)
    merged = build_baseline("flexmoe", anchor=anchor, packages=packages, merged_dir=tmp_path / "m")
    assert merged.config.num_experts == 3
    with pytest.raises(FlexMoEError, match="unknown baseline"):
        build_baseline("btm-ish", anchor=anchor, packages=packages)
    with pytest.raises(FlexMoEError, match="no such expert"):
        build_baseline("specialist:nobody", anchor=anchor, packages=packages)
