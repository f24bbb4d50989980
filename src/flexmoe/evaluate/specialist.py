"""An owner's check of its own expert: held-out scores of the anchor and of the anchor with the
expert (the specialist), domain by domain."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flexmoe.anchor import load_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.data.split import Split
from flexmoe.evaluate.perplexity import DomainScore, evaluate_loaded
from flexmoe.expert.package import load_package
from flexmoe.expert.specialist import build_specialist


@dataclass(frozen=True)
class SpecialistScore:
    domain: str
    anchor: DomainScore
    specialist: DomainScore

    @property
    def relative_change(self) -> float:
        return self.specialist.bits_per_byte / self.anchor.bits_per_byte - 1


def evaluate_specialist(
    package_dir: Path,
    anchor_dir: Path,
    data: list[DataSpec],
    *,
    device: torch.device,
    cache_dir: Path | None,
    split: Split = Split.TEST,
) -> list[SpecialistScore]:
    """Held-out scores of the anchor and of anchor + this expert, domain by domain."""
    anchor = load_anchor(anchor_dir)
    package = load_package(package_dir, anchor)
    specialist = build_specialist(anchor, package)
    kwargs = {"split": split, "device": device, "cache_dir": cache_dir}
    anchor_scores = evaluate_loaded(anchor.model, anchor.tokenizer, data, **kwargs)  # type: ignore[arg-type]
    expert_scores = evaluate_loaded(specialist, anchor.tokenizer, data, **kwargs)  # type: ignore[arg-type]
    return [
        SpecialistScore(domain=a.domain, anchor=a, specialist=s)
        for a, s in zip(anchor_scores, expert_scores, strict=True)
    ]


def format_specialist_table(name: str, scores: list[SpecialistScore]) -> str:
    header = f"{'domain':<12} {'anchor bpb':>11} {name + ' bpb':>16} {'change':>8}"
    lines = [header, "-" * len(header)]
    for s in scores:
        lines.append(
            f"{s.domain:<12} {s.anchor.bits_per_byte:>11.4f} {s.specialist.bits_per_byte:>16.4f} "
            f"{s.relative_change:>+8.1%}"
        )
    return "\n".join(lines)
