"""The demo's results, typed: one schema, written to ``results.json`` and read back from it.

Each stage of the pipeline returns its own record; :class:`DemoResults` holds them all. A file
that does not fit the schema (a field missing, misspelt or of the wrong type) is a one-line
error naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from flexmoe.errors import FlexMoEError
from flexmoe.evaluate.accounting import OwnerCost
from flexmoe.evaluate.extraction import ExtractionResult
from flexmoe.evaluate.registry import Evaluation
from flexmoe.expert.manifest import TrainingSummary
from flexmoe.io import read_json, write_json
from flexmoe.merge.slots import FederatedRound, RouterTuning

Scalar = float | int | str | bool | None
Settings = dict[str, Scalar]  # a training configuration as its JSON record
Scores = dict[str, float]  # domain -> bits per byte


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSettings(Record):
    """The settings a run used."""

    corpora: str
    quick: bool
    ablations: bool
    vocab_size: int
    top_k: int
    eval_bytes_per_domain: int | None
    audit: dict[str, int | float]
    anchor: Settings
    expert: Settings
    unrestricted: Settings
    router_tuning: Settings
    proxy_bytes_per_domain: int
    proxy_documents_per_owner: int
    ceiling_steps: int


class AnchorRecord(Record):
    fingerprint: str
    training: dict[str, float | int | str | None] | None


class ExpertRecord(Record):
    """An owner's expert: owner, licence and its manifest's training summary."""

    owner: str
    license: str
    training: TrainingSummary


class Generation(Record):
    """One answer and each expert's share of its prompt and its generated tokens."""

    text: str
    prompt: Scores
    generated: Scores


class OptOutRecord(Record):
    """One owner opts out of the loaded model and back in."""

    expert: str
    prompt: str
    opted_out_bpb: float
    merged_without_bpb: float
    bpb_difference_vs_merged_without: float
    generation_before: Generation
    generation_after: Generation
    audit: list[list[str]]  # the standing store's audit rows


class AuditRecord(Record):
    """The extraction audit on one owner's training documents."""

    domain: str
    results: list[ExtractionResult]


class CurvePoint(Record):
    round: int
    bpb: Scores


class PrivacyCost(Record):
    """The federated rounds at one ``--dp-owner-epsilon`` (None: no noise)."""

    epsilon: float | None
    noise_multiplier: float
    clip: dict[str, float] | None
    spent: dict[str, float | None]  # each owner's epsilon spent
    bpb: Scores


class FederatedRecord(Record):
    """The federated stage: its recipe, every round's record and its curve."""

    expert_steps: int
    rounds: int
    phases: list[str]
    phase_steps: dict[str, int]
    server: dict[str, float | int | str]  # the server optimiser: name, lr, betas, tau
    trunk_embeddings: str = "none"  # the vocabulary's tensors in the trunk: none, output, all
    owner_steps: int
    specialist_steps: int
    per_round: list[FederatedRound]
    bpb_by_round: list[CurvePoint]
    curve_every: int
    curve_bytes: int | None
    privacy_cost: list[PrivacyCost] = []
    fedavg_rounds: int
    fedavg_steps: int
    fedavg_per_round: list[FederatedRound]

    def curve(self) -> list[tuple[int, float]]:
        """Each scored round and its bits per byte averaged over the domains."""
        return [(p.round, sum(p.bpb.values()) / len(p.bpb)) for p in self.bpb_by_round if p.bpb]


class DemoResults(Record):
    """Everything one demo run measured."""

    settings: RunSettings
    anchor: AnchorRecord
    experts: dict[str, ExpertRecord]
    rivals: dict[str, str] = {}  # name -> description
    evaluation: Evaluation
    router_tuning: RouterTuning | None = None
    federated: FederatedRecord | None = None
    accounting: list[OwnerCost] = []
    opt_out: OptOutRecord
    audit: AuditRecord
    seconds: float
    stage_seconds: dict[str, float]
    device: str
    corpora_description: str

    @classmethod
    def read(cls, path: Path) -> DemoResults:
        """A run's ``results.json``; a file that does not fit is a one-line error."""
        try:
            return cls.model_validate(read_json(path))
        except ValidationError as e:
            error = e.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise FlexMoEError(path, f"{where}: {error['msg']}") from None

    def write(self, path: Path) -> None:
        write_json(path, self.model_dump(mode="json", exclude_unset=True))
