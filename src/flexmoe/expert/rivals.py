"""The coordinator's public rival experts, shipped with the anchor in ``ANCHOR/rivals/``.

The coordinator splits the public text into clusters (k-means of each document's mean
feed-forward input in the anchor) and trains one expert per cluster exactly as an owner trains
hers. Owners then train against them (``expert train`` picks them up from the anchor), so that
every owner's router row learns to compete with the same public experts at the merge's top-k,
and ``merge`` keeps them as slots. Measured on three corpus sets (docs/results.md, the
``rivals-*`` lever rows): with the router objective, the merge with its rivals kept lands
closest to btm of every owner-side lever on all three.

This module says which rivals an anchor ships and which an owner trains against;
``rival_training`` trains them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flexmoe.expert.manifest import MANIFEST_FILE, RIVALS_DIR

DEFAULT_RIVALS = 2
RIVAL_OWNER = "coordinator"
# Experts per token when an owner trains against the rivals: the merge's default top-k
# (flexmoe.merge.DEFAULT_TOP_K, which tests/test_rivals.py checks it equals), so that the router
# row learns to compete as it will in the merged model.
RIVAL_TOP_K = 3


def rival_name(index: int) -> str:
    return f"public-{index}"


def shipped_rivals(anchor_dir: Path) -> list[Path]:
    """The rival packages the anchor ships (``ANCHOR/rivals/*``), in name order."""
    root = Path(anchor_dir) / RIVALS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / MANIFEST_FILE).is_file())


def resolve_rivals(anchor_dir: Path, given: Sequence[Path] | None, *, private: bool) -> list[Path]:
    """The rivals an owner trains against: ``given``, or else (``None``) the anchor's shipped
    ones, unless the expert is trained with DP-SGD (which trains the two-expert model only)."""
    if given is not None:
        return [Path(p) for p in given]
    return [] if private else shipped_rivals(anchor_dir)
