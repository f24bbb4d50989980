"""The demo's settings, kept as data in ``settings.json`` (``full`` and ``quick``) and read into
a typed, validated :class:`DemoSettings`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from flexmoe.errors import FlexMoEError
from flexmoe.evaluate.extraction import AuditSettings
from flexmoe.expert.rivals import DEFAULT_RIVALS
from flexmoe.federated.server import ServerOptimizer
from flexmoe.merge import DEFAULT_TOP_K
from flexmoe.training.config import TrainConfig

SETTINGS_FILE = Path(__file__).with_name("settings.json")


@dataclass(frozen=True)
class FederatedSettings:
    """The federated stage: each owner's first training (shorter than its specialist's), then
    rounds of the stage's phases, so that its steps in all equal the specialist's; the curve
    scored along the way; and the fedavg baseline."""

    expert_steps: int  # each owner's first training, alone
    rounds: int
    phases: tuple[str, ...]  # each round's phases, in order (slot, router, trunk)
    slot: TrainConfig  # each owner's local training in a slot phase
    router: TrainConfig  # ... in a router phase
    trunk: TrainConfig  # ... in a trunk phase
    trunk_sgd: bool  # trunk phases step with plain SGD (the server optimiser adapts)
    trunk_embeddings: str  # the vocabulary's tensors in the trunk: none, output or all
    server: ServerOptimizer  # how the coordinator applies a trunk phase's average
    curve_every: int  # the model is scored every this many rounds ...
    curve_bytes: int  # ... on this many held-out bytes per domain
    fedavg_rounds: int
    fedavg: TrainConfig  # each owner's local training of the dense model per fedavg round

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FederatedSettings:
        configs = {k: TrainConfig.from_dict(data[k]) for k in ("slot", "router", "trunk", "fedavg")}
        server = ServerOptimizer.from_dict(data["server"])
        return cls(**{**data, **configs, "phases": tuple(data["phases"]), "server": server})

    def steps(self, phase: str) -> int:
        """Each owner's local steps in one ``phase`` of a round."""
        return {"slot": self.slot, "router": self.router, "trunk": self.trunk}[phase].steps

    @property
    def owner_steps(self) -> int:
        """Each owner's steps in all: its first training and every round's."""
        return self.expert_steps + self.rounds * sum(self.steps(p) for p in self.phases)


@dataclass(frozen=True)
class DemoSettings:
    vocab_size: int
    anchor: TrainConfig
    expert: TrainConfig
    eval_bytes: int | None  # held-out text scored per domain; None scores the whole test split
    audit: AuditSettings
    tune: TrainConfig  # router tuning after merging (a variant; the default stays untuned)
    proxy_documents: int  # public documents each owner picks as its router-tuning proxies
    proxy_bytes: int  # the ablation that hands over owner text: bytes of it per domain
    ceiling_steps: int  # the router-ceiling ablation: router steps on the scored text itself
    federated: FederatedSettings
    top_k: int = DEFAULT_TOP_K  # experts active per token in the merged model
    rivals: int = DEFAULT_RIVALS  # the coordinator's public rival experts shipped with the anchor

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> DemoSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FlexMoEError(where, f"unknown fields: {', '.join(unknown)}")
        try:
            return cls(
                **{
                    **data,
                    "anchor": TrainConfig.from_dict(data["anchor"]),
                    "expert": TrainConfig.from_dict(data["expert"]),
                    "tune": TrainConfig.from_dict(data["tune"]),
                    "audit": AuditSettings(**data["audit"]),
                    "federated": FederatedSettings.from_dict(data["federated"]),
                }
            )
        except (KeyError, TypeError) as e:
            raise FlexMoEError(where, f"incomplete or malformed settings ({e})") from e

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_settings(name: str, path: Path = SETTINGS_FILE) -> DemoSettings:
    """The named settings (``full`` or ``quick``) from ``path``."""
    table = json.loads(path.read_text())
    if name not in table:
        raise FlexMoEError(path, f"no settings named {name!r} (have {', '.join(table)})")
    return DemoSettings.from_dict(table[name], f"{path}:{name}")
