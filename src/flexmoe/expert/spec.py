"""What an owner's expert is trained on and how: one typed spec, passed whole.

:class:`ExpertSpec` has named parts: the owner's ``data`` and ``identity``, the ``schedule``
(steps, batch, learning rate: a :class:`~flexmoe.training.config.TrainConfig`), the ``public``
share of text mixed in, the ``rivals`` trained against (which packages and at what top-k), the
extra ``objectives``, where the owner's ``router`` row starts, and ``privacy`` (DP-SGD).
``flexmoe expert train`` builds it from its options or its ``--config`` file; Python code
builds it directly and hands it to :func:`flexmoe.expert.train.train_expert` (docs/api.md).
Where the run happens (output directory, device, caches, resuming, signing) is not part of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from flexmoe.data.documents import DataSpec
from flexmoe.expert.identity import check_license, check_name, check_owner
from flexmoe.expert.private import PrivacySettings
from flexmoe.expert.rivals import RIVAL_TOP_K
from flexmoe.router_init import RouterInitMethod
from flexmoe.training.config import EXPERT_TRAINING, TrainConfig


class PublicSample(StrEnum):
    """Which of the public tokens an owner mixes in (``--public-sample``)."""

    PREFIX = "prefix"  # the first ones, in document-id order
    SPREAD = "spread"  # pieces spread evenly over all of them


@dataclass(frozen=True)
class ExpertIdentity:
    name: str
    owner: str
    license: str
    description: str = ""

    def __post_init__(self) -> None:
        check_name("--name", self.name)
        check_owner("--owner", self.owner)
        object.__setattr__(self, "license", check_license(self.license))  # normalised


class Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PublicShare(Part):
    """Public text mixed into the owner's training, so that the router also learns what
    belongs to the public expert (no ``data``: none; the package records the fraction, never
    the files)."""

    data: tuple[DataSpec, ...] = ()
    fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.25
    sample: PublicSample = PublicSample.PREFIX


class Rivals(Part):
    """The coordinator's public experts the owner trains against, at the merge's top-k:
    ``packages`` None takes those the anchor ships (where DP-SGD is off), ``()`` none."""

    packages: tuple[Path, ...] | None = None
    top_k: Annotated[int, Field(ge=1, le=1024)] = RIVAL_TOP_K


class Objectives(Part):
    """Losses besides next-token prediction: ``stay_close`` weighs the expert's squared
    distance from the public expert it started as; ``router`` a loss teaching the router the
    owner's tokens from the public ones (None: on where public text is mixed in and DP-SGD is
    off)."""

    stay_close: Annotated[float, Field(ge=0.0)] = 0.0
    router: Annotated[float, Field(ge=0.0)] | None = None


class RouterStart(Part):
    """Where the owner's router row starts: ``method`` (the anchor's hidden states, an
    ``embedder``'s, or random)."""

    method: RouterInitMethod = RouterInitMethod.ANCHOR_HIDDEN
    embedder: Path | None = None


class ExpertSpec(Part):
    """One expert's training: everything that decides what the package holds."""

    anchor: Path
    data: Annotated[tuple[DataSpec, ...], Field(min_length=1)]
    identity: ExpertIdentity
    schedule: TrainConfig = EXPERT_TRAINING
    public: PublicShare = PublicShare()
    rivals: Rivals = Rivals()
    objectives: Objectives = Objectives()
    router: RouterStart = RouterStart()
    privacy: PrivacySettings | None = None
