"""The expert package: ``expert.safetensors`` (only what was trained) and ``manifest.json``.

Per layer ``l`` the tensors are ``layers.{l}.{gate,up,down}_proj.weight`` (the new expert),
``layers.{l}.router`` (its router row r_1) and ``layers.{l}.bias`` (its bias, already ``<= 0``).
Nothing else: no text, no optimizer state, no path of the owner's machine. Every tensor is stored
in the anchor's dtype (``shapes.dtype``), so a bf16 anchor's packages are half the size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import FlexOlmoForCausalLM, PretrainedConfig

from flexmoe.anchor import Anchor, AnchorInfo, DtypeName
from flexmoe.device import DTYPES, dtype_name
from flexmoe.errors import FlexMoEError
from flexmoe.expert.identity import check_label
from flexmoe.io import read_manifest_model, sha256_file
from flexmoe.model import names
from flexmoe.model.checkpoint import moe_layers, upcycle

MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "expert.safetensors"
PKG_PROJ = "layers.{layer}.{proj}.weight"
PKG_ROUTER = "layers.{layer}.router"
PKG_BIAS = "layers.{layer}.bias"


class RouterInitRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["anchor-hidden", "embedder", "random"]
    params: dict[str, str | int | float] = Field(default_factory=dict)


class TrainingSummary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int
    tokens: int
    final_train_loss: float
    final_val_loss: float | None
    seed: int
    hyperparameters: dict[str, float | int | str | bool | None]


class ExpertShapes(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    num_layers: int
    hidden_size: int
    intermediate_size: int
    dtype: DtypeName = "float32"


class ExpertManifest(BaseModel):
    """The versioned, frozen on-disk contract of an expert package."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    kind: Literal["flexmoe-expert"] = "flexmoe-expert"
    name: str
    owner: str
    license: str
    description: str = ""
    created: str
    anchor_fingerprint: str
    tokenizer_fingerprint: str
    router_init: RouterInitRecord
    training: TrainingSummary
    shapes: ExpertShapes
    files: dict[str, str]
    flexmoe_version: str

    @field_validator("name", "owner", "license")
    @classmethod
    def _label(cls, value: str) -> str:
        return check_label("label", value)


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


def expert_tensors(
    state: Mapping[str, torch.Tensor],
    *,
    num_layers: int,
    slot: int = 1,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The package tensors of expert ``slot`` from an MoE's runtime state dict, rounded to
    ``dtype`` (the anchor's stored dtype; bias stored as ``min(b, 0)``)."""

    def stored(key: str) -> torch.Tensor:
        return state[key].detach().to(dtype).cpu().contiguous().clone()

    out: dict[str, torch.Tensor] = {}
    for layer in range(num_layers):
        for proj in names.PROJECTIONS:
            key = names.EXPERT.format(layer=layer, expert=slot, proj=proj)
            out[PKG_PROJ.format(layer=layer, proj=proj)] = stored(key)
        out[PKG_ROUTER.format(layer=layer)] = stored(
            names.ROUTER_ROW.format(layer=layer, expert=slot)
        )
        bias = stored(names.ROUTER_BIAS.format(layer=layer, index=slot - 1))
        out[PKG_BIAS.format(layer=layer)] = bias.clamp(max=0)
    return out


@dataclass
class ExpertPackage:
    path: Path
    manifest: ExpertManifest
    tensors: dict[str, torch.Tensor]


def read_manifest(path: Path) -> ExpertManifest:
    manifest_path = Path(path) / MANIFEST_FILE
    if not Path(path).is_dir():
        raise FlexMoEError(path, "expert package directory not found")
    return read_manifest_model(manifest_path, ExpertManifest)


def load_package(path: Path, anchor: AnchorInfo | None = None) -> ExpertPackage:
    """Read and check a package: schema, file list and hashes, tensors; against ``anchor`` too.

    Every failure is a :class:`FlexMoEError` naming the file and the fault.
    """
    path = Path(path)
    manifest = read_manifest(path)
    present = {p.name for p in path.iterdir()}
    extra = present - {MANIFEST_FILE, *manifest.files}
    if extra:
        raise FlexMoEError(path, f"unexpected files in the package: {', '.join(sorted(extra))}")
    if set(manifest.files) != {TENSORS_FILE}:
        raise FlexMoEError(path / MANIFEST_FILE, f"files must list exactly {TENSORS_FILE}")
    for name, digest in manifest.files.items():
        if not (path / name).is_file():
            raise FlexMoEError(path / name, "file listed in the manifest is missing")
        if sha256_file(path / name) != digest:
            raise FlexMoEError(
                path / name, "sha256 does not match the manifest (modified or corrupt)"
            )
    try:
        tensors = load_file(path / TENSORS_FILE)
    except (SafetensorError, OSError, ValueError) as e:
        raise FlexMoEError(path / TENSORS_FILE, f"not a readable safetensors file ({e})") from e
    _check_tensors(path / TENSORS_FILE, tensors, manifest.shapes)
    if anchor is not None:
        check_against_anchor(path, manifest, anchor)
    return ExpertPackage(path=path, manifest=manifest, tensors=tensors)


def _check_tensors(where: Path, tensors: dict[str, torch.Tensor], shapes: ExpertShapes) -> None:
    expected = expected_tensor_shapes(shapes)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing:
        raise FlexMoEError(where, f"missing tensors: {', '.join(missing[:3])}")
    if unexpected:
        raise FlexMoEError(where, f"unexpected tensors: {', '.join(unexpected[:3])}")
    for key, tensor in sorted(tensors.items()):
        if tuple(tensor.shape) != expected[key]:
            raise FlexMoEError(
                where, f"tensor {key} has shape {tuple(tensor.shape)}, expected {expected[key]}"
            )
        if tensor.dtype != DTYPES[shapes.dtype]:
            raise FlexMoEError(
                where, f"tensor {key} has dtype {dtype_name_of(tensor)}, expected {shapes.dtype}"
            )
        if not torch.isfinite(tensor).all():
            raise FlexMoEError(where, f"tensor {key} holds NaN or Inf values")
    for layer in range(shapes.num_layers):
        if tensors[PKG_BIAS.format(layer=layer)].item() > 0:
            raise FlexMoEError(
                where, f"tensor {PKG_BIAS.format(layer=layer)} is positive; biases are <= 0"
            )


def dtype_name_of(tensor: torch.Tensor) -> str:
    """A tensor's dtype as a manifest names it (``float32``), or torch's name for any other."""
    return next((n for n, d in DTYPES.items() if d == tensor.dtype), str(tensor.dtype))


def check_against_anchor(path: Path, manifest: ExpertManifest, anchor: AnchorInfo) -> None:
    """The package was trained on this very anchor and tokenizer, with matching shapes."""
    check_compatible(
        path, manifest, anchor_fingerprint=anchor.manifest.fingerprint,
        tokenizer_fingerprint=anchor.manifest.tokenizer_fingerprint, config=anchor.config,
        dtype=anchor.dtype,
    )  # fmt: skip


def check_compatible(
    path: Path, manifest: ExpertManifest, *, anchor_fingerprint: str, tokenizer_fingerprint: str,
    config: PretrainedConfig, dtype: torch.dtype,
) -> None:  # fmt: skip
    """The package was trained on the anchor and tokenizer with these fingerprints, and its
    shapes and dtype fit ``config`` and ``dtype`` (the anchor's, or a merged model's that was
    built on that anchor)."""
    if manifest.anchor_fingerprint != anchor_fingerprint:
        theirs, ours = manifest.anchor_fingerprint[:12], anchor_fingerprint[:12]
        raise FlexMoEError(
            path, f"trained on another anchor ({theirs}...; this anchor is {ours}...)"
        )
    if manifest.tokenizer_fingerprint != tokenizer_fingerprint:
        raise FlexMoEError(path, "trained with another tokenizer than this anchor's")
    want = ExpertShapes(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        dtype=dtype_name(dtype),  # type: ignore[arg-type]
    )
    if manifest.shapes != want:
        raise FlexMoEError(
            path,
            f"shapes {manifest.shapes.model_dump()} do not match the anchor's {want.model_dump()}",
        )


def build_specialist(
    anchor: Anchor, package: ExpertPackage, *, use_bias: bool = True
) -> FlexOlmoForCausalLM:
    """The owner's 2-expert model: the anchor (slot 0) plus this expert (slot 1), top-2 of 2."""
    model = upcycle(anchor.model, num_experts=2, top_k=2)
    with torch.no_grad():
        for layer, moe in enumerate(moe_layers(model)):
            moe.use_bias = use_bias
            moe.router.rows[0].copy_(anchor.public_router[layer])
            moe.router.rows[1].copy_(package.tensors[PKG_ROUTER.format(layer=layer)])
            moe.router.biases[0].copy_(package.tensors[PKG_BIAS.format(layer=layer)])
            for proj in names.PROJECTIONS:
                getattr(moe.experts[1], proj).weight.copy_(
                    package.tensors[PKG_PROJ.format(layer=layer, proj=proj)]
                )
    return model.eval()
