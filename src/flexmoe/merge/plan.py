"""The merge plan: which package goes to which slot, validated before anything is written.

Slot 0 is the public expert (the anchor's MLP and r_0); slot k is the k-th package in the order
given. Every package is checked against the anchor as ``flexmoe expert verify`` does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flexmoe.anchor import AnchorInfo, open_anchor
from flexmoe.errors import FlexMoEError, printable
from flexmoe.expert.identity import name_key, refuse_look_alike
from flexmoe.expert.manifest import TENSORS_FILE, ExpertManifest
from flexmoe.expert.package import load_package, package_projection, weight_delta
from flexmoe.expert.signing import Signer
from flexmoe.merge import DEFAULT_TOP_K

if TYPE_CHECKING:
    from flexmoe.expert.registry import KeyRegistry


@dataclass(frozen=True)
class Slot:
    """One expert slot of the merged model."""

    index: int
    name: str
    owner: str
    license: str
    source: Path  # the tensors file the slot's expert weights come from
    bytes: int
    package_sha256: str  # of the package's manifest.json, which pins its tensors' sha256
    manifest: ExpertManifest | None  # None for the public slot
    signer: Signer | None = None


@dataclass(frozen=True)
class MergePlan:
    anchor: AnchorInfo
    slots: list[Slot]
    top_k: int
    signatures_required: bool | None = None  # None: no key registry was asked

    @property
    def num_experts(self) -> int:
        return len(self.slots)


def plan_merge(
    anchor_dir: Path,
    package_dirs: list[Path],
    *,
    top_k: int | None = None,
    registry: KeyRegistry | None = None,
) -> MergePlan:
    """Validate the anchor and every package (signatures against ``registry`` when given);
    assign slots; check names and top-k."""
    if not package_dirs:
        raise FlexMoEError("--expert", "give at least one expert package")
    anchor = open_anchor(anchor_dir)  # fingerprints checked, tensors streamed, no model built
    anchor_bytes = anchor.weight_bytes()
    slots = [
        Slot(
            index=0,
            name="public",
            owner="coordinator",
            license="public",
            source=anchor.path,
            bytes=anchor_bytes,
            package_sha256=anchor.manifest.fingerprint,
            manifest=None,
        )
    ]
    samples: list[tuple[str, torch.Tensor]] = []
    for index, path in enumerate(package_dirs, start=1):
        package = load_package(path, anchor, registry)
        m = package.manifest
        taken = next((s.name for s in slots if name_key(s.name) == name_key(m.name)), None)
        if taken is not None:
            raise FlexMoEError(path, f"expert name {m.name!r} is already taken ({taken!r})")
        refuse_look_alike(path, m.owner, [s.owner for s in slots[1:]])
        sample = weight_delta(package_projection(package.tensors), anchor.ffn_sample())
        refuse_copy(path, sample, samples)
        samples.append((m.name, sample))
        slots.append(
            Slot(
                index=index,
                name=m.name,
                owner=m.owner,
                license=m.license,
                source=Path(path) / TENSORS_FILE,
                bytes=(Path(path) / TENSORS_FILE).stat().st_size,
                package_sha256=package.manifest_sha256,
                manifest=m,
                signer=package.signer,
            )
        )
    top_k = min(DEFAULT_TOP_K, len(slots)) if top_k is None else top_k
    if not 1 <= top_k <= len(slots):
        raise FlexMoEError("--top-k", f"must be between 1 and {len(slots)}, got {top_k}")
    required = registry.require_signatures if registry is not None else None
    return MergePlan(anchor=anchor, slots=slots, top_k=top_k, signatures_required=required)


NEAR_COPY = 0.999  # cosine of two experts' changes from the anchor above which one copies


def refuse_copy(
    path: Path, delta: torch.Tensor, others: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Refuse a package whose change from the anchor (``delta``) is a copy of another slot's:
    one owner's expert under another name would bypass that owner's opt-out."""
    for name, other in others:
        similarity = float(torch.nn.functional.cosine_similarity(delta, other, dim=0))
        if similarity > NEAR_COPY:
            raise FlexMoEError(
                path,
                f"its expert is a copy of {name!r}'s (cosine {similarity:.6f}); one "
                "owner's expert under another name would bypass that owner's opt-out",
            )


def format_plan(plan: MergePlan) -> str:
    """The plan as a table: slot, expert, owner, license, bytes, source file."""
    rows = [("slot", "expert", "owner", "license", "signed by", "bytes", "source")]
    for s in plan.slots:
        signer = f"{s.signer.fingerprint[:16]}" if s.signer else "-"
        rows.append(
            (
                str(s.index),
                printable(s.name),
                printable(s.owner),
                s.license,
                signer,
                f"{s.bytes:,}",
                printable(str(s.source)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(f"{plan.num_experts} experts, top-{plan.top_k} routing")
    return "\n".join(lines)


def plan_dict(plan: MergePlan) -> dict[str, object]:
    """The plan as JSON."""
    return {
        "experts": plan.num_experts,
        "top_k": plan.top_k,
        "slots": [
            {
                "slot": s.index,
                "expert": s.name,
                "owner": s.owner,
                "license": s.license,
                "signer": s.signer.fingerprint if s.signer else None,
                "bytes": s.bytes,
                "source": str(s.source),
            }
            for s in plan.slots
        ],
    }
