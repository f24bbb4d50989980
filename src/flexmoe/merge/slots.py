"""The slot table of a merged model (``flexmoe_slots.json``): who owns each slot, the owners'
learned biases, the router's tuning record. A frozen, versioned on-disk contract.

Schema 2 dropped ``top_k``: a merged model's top-k lives in ``config.json`` alone
(``num_experts_per_tok``). Schema 1 tables still load; their ``top_k`` is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from flexmoe.expert.manifest import ExpertManifest

SLOTS_SCHEMA = 2


class SignerRecord(BaseModel):
    """The verified signer of a slot's package."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fingerprint: str
    owner: str | None


class RouterTuning(BaseModel):
    """What router tuning after the merge saw: counts and a hash of the documents, never text."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    time: str
    data: dict[str, int]  # domain -> documents
    documents_sha256: str
    steps: int
    tokens: int
    final_train_loss: float
    final_val_loss: float | None
    biases_tuned: bool
    hyperparameters: dict[str, float | int | str | bool | None]


class RouterCalibration(BaseModel):
    """The coordinator's rescaling of the owners' rows on public text (an ablation lever)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    time: str
    method: str
    public_tokens: int


class SlotRecord(BaseModel):
    """One slot: slot 0 is the public expert (no package), slot k owner k's expert."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slot: int
    name: str
    owner: str
    license: str
    package_sha256: str | None
    bias: list[float]  # the owner's learned negative bias, per layer
    manifest: ExpertManifest | None
    signer: SignerRecord | None

    @property
    def epsilon(self) -> float | None:
        """DP-SGD's spent epsilon, when the expert was trained with it."""
        privacy = self.manifest.training.privacy if self.manifest else None
        return privacy.epsilon if privacy else None


class RouterVersion(BaseModel):
    """One version of every router row, and what it was computed from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int  # 0: the rows as merged
    round: int
    phase: Literal["merge", "slots", "router", "trunk"]
    participants: list[str]  # the experts whose owners' text trained it in this phase
    shaped_by: list[str]  # every expert whose text or weights it depends on, its parents' too
    trained_against: dict[str, int]  # expert -> the slot version it was computed with
    trunk_version: int = 0  # the shared trunk it was computed inside
    parent: int | None
    file: str  # under flexmoe_versions/: the rows, float32
    sha256: str


class SlotVersion(BaseModel):
    """One version of one owner's slot (its feed-forward and router row)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: int  # 0: the package merged
    round: int
    shaped_by: list[str]
    trained_against: dict[str, int]  # the other experts' slot versions it was refined with
    router_version: int | None  # the rows it was refined with
    trunk_version: int = 0  # the shared trunk it was refined inside
    package: str  # its directory under flexmoe_versions/ (version 0: the tensors alone)
    tensors_sha256: str | None  # None: version 0, still in the weights and not yet kept apart
    record: SlotRecord  # its row of the slot table while it is current


class ServerOptimizerRecord(BaseModel):
    """How the coordinator applied the owners' averaged change (FedOpt, Reddi et al. 2021):
    ``fedavg`` adds it; ``fedadam`` and ``fedyogi`` treat it as a pseudo-gradient."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Literal["fedavg", "fedadam", "fedyogi"]
    lr: float
    beta1: float
    beta2: float
    tau: float
    decay_steps: int = 0  # > 0: the lr's cosine decay to lr / 10 at this step
    step: int  # server steps taken so far, this one included (its state is in the file)


class TrunkVersion(BaseModel):
    """One version of the shared trunk: every parameter all owners share (attention, norms, the
    public and the coordinator's rival experts), and the server optimiser's state."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int  # 0: the trunk as merged
    round: int
    participants: list[str]
    shaped_by: list[str]
    trained_against: dict[str, int]  # expert -> the slot version it was computed with
    router_version: int | None  # the rows it was trained with (None: version 0)
    parent: int | None
    adapters: str  # "full", or "lora-R": each owner trained rank-R adapters of the matrices
    optimizer: ServerOptimizerRecord | None  # None: version 0
    parameters: int  # values in the trunk (what an update of it carries)
    file: str | None  # under flexmoe_versions/: the tensors, float32, and the optimiser state;
    # None: dropped, since a newer version shaped by the same experts supersedes it
    sha256: str | None


class RoundPrivacy(BaseModel):
    """The noise every owner added to each update it sent in a round (``--dp-owner-epsilon``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    noise_multiplier: float  # the noise's standard deviation, in units of the clipping norm
    clip: dict[str, float]  # phase -> the L2 norm each update was clipped to
    delta: float


class FederatedRound(BaseModel):
    """What one round did: who took part in each phase and what each owner sent."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    round: int
    phases: list[str]
    participants: dict[str, list[str]]  # phase -> experts whose owners replied
    failures: dict[str, int]  # phase -> owners that did not reply
    bytes_sent: dict[str, int]  # expert -> bytes its owner sent this round
    secure_aggregation: bool
    steps: dict[str, int]  # phase -> local steps per owner
    tokens: dict[str, int] = {}  # expert -> tokens its owner trained on this round, all phases
    privacy: RoundPrivacy | None = None  # None: the updates went without noise


class Federation(BaseModel):
    """Every router and slot version of a merged model and the rounds that made them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    router_versions: list[RouterVersion]
    slot_versions: list[SlotVersion]
    current_router: int  # the router version in the weights
    current_slots: dict[str, int]  # expert -> its slot version in the weights
    rounds: list[FederatedRound]
    trunk_versions: list[TrunkVersion] = []  # empty: no trunk phase yet (the weights' own)
    current_trunk: int = 0
    # expert -> epsilon at ``delta`` over every update its owner sent in these rounds (Opacus's
    # RDP accountant); None: some of them went without noise
    epsilon: dict[str, float | None] = {}
    delta: float | None = None

    def slot_version(self, name: str, version: int) -> SlotVersion:
        return next(v for v in self.slot_versions if v.name == name and v.version == version)


class SlotTable(BaseModel):
    """Every slot of a merged model and what the model was made from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[2] = 2
    anchor_fingerprint: str
    base_model: str | None = None  # the anchor, as the model card names it
    tokenizer_fingerprint: str
    router_tuning: RouterTuning | None = None
    router_calibration: RouterCalibration | None = None
    signatures_required: bool | None = None  # None: no key registry was asked
    federation: Federation | None = None  # the versions federated rounds made
    slots: list[SlotRecord]

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """A schema-1 table: its copy of top-k is dropped (config.json holds it)."""
        if isinstance(data, dict) and data.get("schema_version") == 1:
            data = {k: v for k, v in data.items() if k != "top_k"} | {"schema_version": 2}
        return data

    @model_validator(mode="after")
    def _in_order(self) -> SlotTable:
        if [s.slot for s in self.slots] != list(range(len(self.slots))):
            raise ValueError("slots must be numbered 0, 1, 2, ... in order")
        if not self.slots:
            raise ValueError("a merged model has at least the public slot")
        return self

    def infos(self) -> list[SlotInfo]:
        return [SlotInfo.of(s) for s in self.slots]

    def index_of(self, name: str) -> int | None:
        return next((s.slot for s in self.slots if s.name == name), None)


@dataclass(frozen=True)
class SlotInfo:
    """What inference, serving and listings need of a slot."""

    index: int
    name: str
    owner: str
    license: str
    signer: str | None = None  # the signing key's fingerprint, when the package was signed
    epsilon: float | None = None  # DP-SGD's spent epsilon, when trained with it

    @classmethod
    def of(cls, record: SlotRecord) -> SlotInfo:
        signer = record.signer.fingerprint if record.signer else None
        return cls(record.slot, record.name, record.owner, record.license, signer, record.epsilon)
