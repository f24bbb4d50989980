"""The expert package's on-disk format: ``manifest.json`` and the names of its tensors.

Only the format: what the manifest holds and how it is read and checked, with nothing that
loads torch or builds a model (``package.py`` reads the tensors and builds models from them), so
that a command that reads metadata starts fast.
"""

from __future__ import annotations

import math
import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flexmoe.errors import FlexMoEError
from flexmoe.expert.identity import as_field, check_license, check_name, check_owner
from flexmoe.io import parse_json, read_bounded, validate_model

if TYPE_CHECKING:
    from flexmoe.training.loop import TrainResult

DtypeName = Literal["float32", "bfloat16", "float16"]
MANIFEST_FILE = "manifest.json"
RIVALS_DIR = "rivals"  # the coordinator's public rival packages, in the anchor directory
TENSORS_FILE = "expert.safetensors"
PKG_PROJ = "layers.{layer}.{proj}.weight"
PKG_ROUTER = "layers.{layer}.router"
PKG_BIAS = "layers.{layer}.bias"


class RouterInitRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["anchor-hidden", "embedder", "random"]
    params: dict[str, str | int | float] = Field(default_factory=dict)


Count = Annotated[int, Field(ge=0, le=10**15)]
Loss = Annotated[float, Field(ge=0, le=1e4, allow_inf_nan=False)]
Dim = Annotated[int, Field(ge=1, le=1 << 20)]
Short = Annotated[str, Field(max_length=200)]


class RivalUse(BaseModel):
    """One of the coordinator's rival experts an expert was trained against: its name and
    version (the first 16 hex digits of the sha256 of its manifest; None in packages made
    before versions were recorded)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Short
    version: Annotated[str, Field(pattern="^[0-9a-f]{16}$")] | None = None


class TrainingSummary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: Count
    tokens: Count
    final_train_loss: Loss
    final_val_loss: Loss | None
    seed: Count
    hyperparameters: Annotated[dict[Short, float | int | Short | bool | None], Field(max_length=64)]
    privacy: PrivacyRecord | None = None  # DP-SGD: the accountant's epsilon and its terms
    rivals: Annotated[list[RivalUse], Field(max_length=64)] = []  # trained against these ...
    rival_top_k: Annotated[int, Field(ge=0, le=1024)] = 0  # ... at this top-k (0: no rivals)

    @model_validator(mode="before")
    @classmethod
    def _rivals_from_hyperparameters(cls, data: object) -> object:
        """Packages made before the typed list kept the rivals in the hyperparameters as
        comma-joined strings ("rivals", "rival_manifests", "rival_top_k"): read them as the
        list (the manifest's bytes, and so its hash and signature, stay as they are)."""
        if not isinstance(data, dict) or "rivals" in data:
            return data
        hyper = data.get("hyperparameters")
        if not isinstance(hyper, dict) or "rivals" not in hyper:
            return data
        hyper = dict(hyper)
        names = [n for n in str(hyper.pop("rivals") or "").split(",") if n]
        versions = [v for v in str(hyper.pop("rival_manifests", "") or "").split(",") if v]
        top_k = hyper.pop("rival_top_k", 0)
        rivals = [
            {"name": name, "version": versions[i] if i < len(versions) else None}
            for i, name in enumerate(names)
        ]
        return {**data, "hyperparameters": hyper, "rivals": rivals, "rival_top_k": top_k or 0}

    @classmethod
    def of(
        cls,
        result: TrainResult,
        seed: int,
        hyperparameters: dict[str, float | int | str | bool | None],
        privacy: PrivacyRecord | None = None,
        rivals: tuple[list[RivalUse], int] = ([], 0),
    ) -> TrainingSummary:
        """The summary of a training run's result; ``rivals``: those it trained against and
        the top-k it trained at."""
        return cls(
            steps=result.steps,
            tokens=result.tokens,
            final_train_loss=result.final_train_loss,
            final_val_loss=result.final_val_loss,
            seed=seed,
            hyperparameters=hyperparameters,
            privacy=privacy,
            rivals=rivals[0],
            rival_top_k=rivals[1],
        )


class ExpertShapes(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    num_layers: Annotated[int, Field(ge=1, le=1024)]
    hidden_size: Dim
    intermediate_size: Dim
    dtype: DtypeName = "float32"


class ExpertManifest(BaseModel):
    """The versioned, frozen on-disk contract of an expert package."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    kind: Literal["flexmoe-expert"] = "flexmoe-expert"
    name: str
    owner: str
    license: str
    description: Annotated[str, Field(max_length=2000)] = ""
    created: Annotated[str, Field(max_length=40)]
    anchor_fingerprint: Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
    tokenizer_fingerprint: Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
    router_init: RouterInitRecord
    training: TrainingSummary
    shapes: ExpertShapes
    files: Annotated[
        dict[Short, Annotated[str, Field(pattern="^[0-9a-f]{64}$")]], Field(max_length=4)
    ]
    flexmoe_version: Short

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return as_field(check_name, "name", value)

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str) -> str:
        return as_field(check_owner, "owner", value)

    @field_validator("license")
    @classmethod
    def _license(cls, value: str) -> str:
        as_field(lambda field, v: check_license(v, field), "license", value)
        return value

    @field_validator("created")
    @classmethod
    def _created(cls, value: str) -> str:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("not an ISO 8601 date and time") from None
        return value


def expected_tensor_shapes(shapes: ExpertShapes) -> dict[str, tuple[int, ...]]:
    h, f = shapes.hidden_size, shapes.intermediate_size
    out: dict[str, tuple[int, ...]] = {}
    for layer in range(shapes.num_layers):
        out[PKG_PROJ.format(layer=layer, proj="gate_proj")] = (f, h)
        out[PKG_PROJ.format(layer=layer, proj="up_proj")] = (f, h)
        out[PKG_PROJ.format(layer=layer, proj="down_proj")] = (h, f)
        out[PKG_ROUTER.format(layer=layer)] = (h,)
        out[PKG_BIAS.format(layer=layer)] = ()
    return out


class PrivacyRecord(BaseModel):
    """What the manifest says of a DP-trained expert: the accountant's epsilon and how."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mechanism: Literal["dp-sgd"] = "dp-sgd"
    accountant: Literal["rdp"] = "rdp"
    epsilon: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]  # spent
    target_epsilon: Annotated[float, Field(gt=0, le=1000)]
    delta: Annotated[float, Field(gt=0, lt=1)]
    max_grad_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    noise_multiplier: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]
    sample_rate: Annotated[float, Field(gt=0, le=1)]
    steps: Annotated[int, Field(ge=0, le=10**12)]
    unit_tokens: Annotated[int, Field(ge=2, le=1 << 24)]  # the privacy unit: one block


def accountant_epsilon(record: PrivacyRecord) -> float:
    """Epsilon at ``record.delta`` for its noise, sample rate and steps, from a fresh RDP
    accountant (what ``verify`` and the tests compare the manifest with)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(record.noise_multiplier, record.sample_rate, record.steps)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="opacus")  # alpha-range advice
        return float(accountant.get_epsilon(delta=record.delta))


def check_record(where: Path, record: PrivacyRecord) -> None:
    """A manifest's epsilon is the accountant's for its own terms: a package cannot claim more
    privacy than its noise, sample rate and steps give."""
    recomputed = accountant_epsilon(record)
    if not math.isclose(recomputed, record.epsilon, rel_tol=1e-6, abs_tol=1e-9):
        raise FlexMoEError(
            where,
            f"field 'training.privacy.epsilon': {record.epsilon:.6g} is not what its "
            f"noise, sample rate and steps give ({recomputed:.6g})",
        )


def read_manifest_raw(path: Path) -> tuple[bytes, ExpertManifest]:
    """The manifest's bytes, read once, and what they say."""
    if not Path(path).is_dir():
        raise FlexMoEError(path, "expert package directory not found")
    manifest_path = Path(path) / MANIFEST_FILE
    raw = read_bounded(manifest_path)
    return raw, validate_model(parse_json(raw, manifest_path), manifest_path, ExpertManifest)


def read_manifest(path: Path) -> ExpertManifest:
    return read_manifest_raw(path)[1]
