"""Training the coordinator's public rival experts (``flexmoe anchor rivals``): the public text
split into clusters (k-means of each document's mean feed-forward input in the anchor), one
expert trained per cluster exactly as an owner trains hers, written to ``ANCHOR/rivals/``."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from flexmoe.anchor import load_anchor
from flexmoe.data.documents import DataSpec, Document, write_jsonl
from flexmoe.data.split import load_splits
from flexmoe.errors import FlexMoEError
from flexmoe.expert.manifest import RIVALS_DIR, ExpertManifest
from flexmoe.expert.rivals import RIVAL_OWNER, rival_name
from flexmoe.expert.spec import ExpertIdentity, ExpertSpec, PublicShare, Rivals
from flexmoe.expert.train import train_expert
from flexmoe.io import atomic_directory
from flexmoe.model.probe import document_ffn_inputs
from flexmoe.training.config import TrainConfig


def clusters(points: torch.Tensor, count: int, *, seed: int = 0, rounds: int = 25) -> list[int]:
    """k-means (cosine) of ``points (D, H)`` into ``count`` clusters: each point's cluster."""
    unit = torch.nn.functional.normalize(points.float(), dim=-1)
    generator = torch.Generator().manual_seed(seed)
    centres = unit[torch.randperm(len(unit), generator=generator)[:count]]
    for _ in range(rounds):
        chosen = (unit @ centres.T).argmax(-1)
        for c in range(count):
            members = unit[chosen == c]
            if len(members):
                centres[c] = torch.nn.functional.normalize(members.mean(0), dim=-1)
    return [int(c) for c in (unit @ centres.T).argmax(-1)]


def public_clusters(
    anchor_dir: Path, public: list[DataSpec], count: int, device: torch.device
) -> list[list[Document]]:
    """The public training documents in ``count`` clusters by their mean feed-forward input in
    the anchor (every layer's, averaged)."""
    docs = load_splits(public).train
    if len(docs) < count:
        raise FlexMoEError(
            "--count", f"{count} rivals need {count} public documents, not {len(docs)}"
        )
    anchor = load_anchor(anchor_dir, device=device)
    points = document_ffn_inputs(
        anchor.model, anchor.tokenizer, [d.text for d in docs], device=device
    ).mean(1)  # (D, H)
    chosen = clusters(points, count)
    parts = [[d for d, c in zip(docs, chosen, strict=True) if c == i] for i in range(count)]
    if not all(parts):
        raise FlexMoEError("--count", f"the public text does not split into {count} clusters")
    return parts


def write_clusters(parts: list[list[Document]], root: Path) -> list[DataSpec]:
    """Each cluster as a JSONL corpus under ``root``, named after its rival."""
    root.mkdir(parents=True, exist_ok=True)
    specs = []
    for i, part in enumerate(parts):
        path = root / f"{rival_name(i)}.jsonl"
        write_jsonl(path, ((d.doc_id, d.text) for d in part))
        specs.append(DataSpec(rival_name(i), (str(path),), "text", "id"))
    return specs


def train_rivals(
    anchor_dir: Path,
    public: list[DataSpec],
    *,
    count: int,
    license: str,
    cfg: TrainConfig,
    device: torch.device,
    cache_dir: Path | None,
    signing_key: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[ExpertManifest]:
    """Train ``count`` rivals on clusters of ``public`` and write them to ``ANCHOR/rivals/``
    (all of them or, on any failure, none: the folder is replaced in one rename)."""
    if count < 1:
        raise FlexMoEError("--count", f"must be >= 1, got {count}")
    target = Path(anchor_dir) / RIVALS_DIR
    if target.exists() and not overwrite:
        raise FlexMoEError(target, "the anchor already ships rivals; pass --force to replace them")
    parts = public_clusters(anchor_dir, public, count, device)
    manifests = []
    with atomic_directory(target, overwrite=True) as tmp:
        specs = write_clusters(parts, tmp / ".clusters")
        for i, spec in enumerate(specs):
            identity = ExpertIdentity(
                name=spec.domain,
                owner=RIVAL_OWNER,
                license=license,
                description=f"public text, cluster {i + 1} of {count} ({len(parts[i])} documents)",
            )
            rival = ExpertSpec(
                anchor=anchor_dir,
                data=(spec,),
                identity=identity,
                schedule=cfg,
                public=PublicShare(data=tuple(public)),
                rivals=Rivals(packages=()),  # not against each other
            )
            manifest, _ = train_expert(
                rival,
                out=tmp / spec.domain,
                device=device,
                cache_dir=cache_dir,
                progress=progress,
                signing_key=signing_key,
            )
            manifests.append(manifest)
        shutil.rmtree(tmp / ".clusters")  # the public text stays where it was
    return manifests
