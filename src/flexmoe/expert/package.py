"""The expert package: ``expert.safetensors`` (only what was trained) and ``manifest.json``.

Per layer ``l`` the tensors are ``layers.{l}.{gate,up,down}_proj.weight`` (the new expert),
``layers.{l}.router`` (its router row r_1) and ``layers.{l}.bias`` (its bias, already ``<= 0``).
Nothing else: no text, no optimizer state, no path of the owner's machine. Every tensor is stored
in the anchor's dtype (``shapes.dtype``), so a bf16 anchor's packages are half the size.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import FlexOlmoForCausalLM, PretrainedConfig

from flexmoe.anchor import Anchor, AnchorInfo, DtypeName, weight_sample
from flexmoe.device import DTYPES, dtype_name
from flexmoe.errors import FlexMoEError
from flexmoe.expert.identity import as_field, check_license, check_name, check_owner
from flexmoe.expert.private import PrivacyRecord, check_record
from flexmoe.expert.signing import (
    SIGNATURE_FILE,
    Signature,
    Signer,
    read_signature,
    sign_manifest,
)
from flexmoe.io import parse_json, read_bounded, sha256_file, validate_model, write_json
from flexmoe.model import names
from flexmoe.model.checkpoint import moe_layers, upcycle

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from flexmoe.expert.registry import KeyRegistry
    from flexmoe.training.loop import TrainResult

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


class TrainingSummary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: Count
    tokens: Count
    final_train_loss: Loss
    final_val_loss: Loss | None
    seed: Count
    hyperparameters: Annotated[dict[Short, float | int | Short | bool | None], Field(max_length=64)]
    privacy: PrivacyRecord | None = None  # DP-SGD: the accountant's epsilon and its terms

    @classmethod
    def of(
        cls,
        result: TrainResult,
        seed: int,
        hyperparameters: dict[str, float | int | str | bool | None],
        privacy: PrivacyRecord | None = None,
    ) -> TrainingSummary:
        """The summary of a training run's result."""
        return cls(
            steps=result.steps,
            tokens=result.tokens,
            final_train_loss=result.final_train_loss,
            final_val_loss=result.final_val_loss,
            seed=seed,
            hyperparameters=hyperparameters,
            privacy=privacy,
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
    manifest_sha256: str  # of the manifest's bytes as read, which pin its tensors' sha256
    signer: Signer | None = None  # verified; its owner known only when a registry was asked


def _read_manifest(path: Path) -> tuple[bytes, ExpertManifest]:
    """The manifest's bytes, read once, and what they say."""
    if not Path(path).is_dir():
        raise FlexMoEError(path, "expert package directory not found")
    manifest_path = Path(path) / MANIFEST_FILE
    raw = read_bounded(manifest_path)
    return raw, validate_model(parse_json(raw, manifest_path), manifest_path, ExpertManifest)


def read_manifest(path: Path) -> ExpertManifest:
    return _read_manifest(path)[1]


def load_package(
    path: Path, anchor: AnchorInfo | None = None, registry: KeyRegistry | None = None
) -> ExpertPackage:
    """Read and check a package: schema, file list and hashes, signature, tensors; against
    ``anchor`` and the key ``registry`` too.

    A signature present is always verified against the manifest's bytes (the same bytes that are
    parsed); the registry then says whether its key is known, live and the manifest owner's, and
    whether an unsigned package is taken. Every failure is a :class:`FlexMoEError` naming the
    file and the fault.
    """
    path = Path(path)
    if path.is_symlink():
        raise FlexMoEError(path, "the package directory is a symbolic link")
    if not path.is_dir():
        raise FlexMoEError(path, "expert package directory not found")
    entries = list(path.iterdir())
    for entry in entries:
        if entry.is_symlink() or not entry.is_file():
            raise FlexMoEError(entry, "not a regular file (links and special files refused)")
    raw, manifest = _read_manifest(path)
    manifest_path = path / MANIFEST_FILE
    extra = {p.name for p in entries} - {MANIFEST_FILE, SIGNATURE_FILE, *manifest.files}
    if extra:
        raise FlexMoEError(path, f"unexpected files in the package: {', '.join(sorted(extra))}")
    if set(manifest.files) != {TENSORS_FILE}:
        raise FlexMoEError(path / MANIFEST_FILE, f"files must list exactly {TENSORS_FILE}")
    if manifest.training.privacy is not None:
        check_record(manifest_path, manifest.training.privacy)
    signature = read_signature(path)
    signer = None
    if signature is not None:
        signature.verify(raw, path / SIGNATURE_FILE)
        signer = Signer(signature.fingerprint, None)
    if registry is not None:
        signer = registry.check(path, manifest.owner, signature)
    tensors_path = path / TENSORS_FILE
    if not tensors_path.is_file():
        raise FlexMoEError(tensors_path, "file listed in the manifest is missing")
    _check_size(tensors_path, manifest.shapes)  # before hashing a file of any size
    if sha256_file(tensors_path) != manifest.files[TENSORS_FILE]:
        raise FlexMoEError(tensors_path, "sha256 does not match the manifest (modified or corrupt)")
    try:
        tensors = load_file(tensors_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise FlexMoEError(tensors_path, f"not a readable safetensors file ({e})") from e
    _check_tensors(tensors_path, tensors, manifest.shapes)
    if anchor is not None:
        check_against_anchor(path, manifest, anchor)
        check_values(path, tensors, manifest.shapes, anchor.public_router, anchor.ffn_scales())
    return ExpertPackage(
        path=path,
        manifest=manifest,
        tensors=tensors,
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        signer=signer,
    )


def _check_size(path: Path, shapes: ExpertShapes) -> None:
    """The file is no larger than the manifest's shapes say, and its header is of a sane size:
    checked from the file's size and first 8 bytes alone, before anything is hashed or read (a
    smaller file goes on, to be refused with the precise fault)."""
    expected = sum(math.prod(s) for s in expected_tensor_shapes(shapes).values())
    data = expected * DTYPES[shapes.dtype].itemsize
    header_limit = 256 * (5 * shapes.num_layers) + 4096  # generous per tensor entry
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    if header > header_limit:
        raise FlexMoEError(
            path,
            f"not a readable safetensors file (a header of {header:,} bytes; at most "
            f"{header_limit:,})",
        )
    if size - 8 - header > data:
        raise FlexMoEError(
            path, f"is {size:,} bytes; the manifest's shapes make {data + 8 + header:,}"
        )


ROUTER_NORM_LIMIT = 100.0  # times the public row's norm in the same layer
WEIGHT_LIMIT = 100.0  # times the largest magnitude of the anchor's same projection


FfnKey = tuple[int, str]  # (layer, projection)


def weight_delta(
    load: Callable[[FfnKey], torch.Tensor], base: dict[FfnKey, torch.Tensor]
) -> torch.Tensor:
    """A sample of how an expert's weights (``load(key)``, one projection at a time) differ from
    the feed-forward it started from (``base``, samples of the anchor's): two owners' honest
    experts differ in different directions; a copy does not."""
    return torch.cat([weight_sample(load(key)) - base[key] for key in sorted(base)])


def package_projection(tensors: dict[str, torch.Tensor]) -> Callable[[FfnKey], torch.Tensor]:
    """A package's projection by (layer, projection)."""
    return lambda key: tensors[PKG_PROJ.format(layer=key[0], proj=key[1])]


def check_values(
    path: Path,
    tensors: dict[str, torch.Tensor],
    shapes: ExpertShapes,
    public_router: torch.Tensor,
    scales: dict[FfnKey, float],
) -> None:
    """Magnitudes a trained expert cannot reach by honest training: a router row far longer than
    the public one (``public_router``, one row per layer; it would take every token) or weights
    far beyond the anchor's feed-forward (``scales``, the largest magnitude per projection; they
    would swamp every other expert's output)."""
    for layer in range(shapes.num_layers):
        key = PKG_ROUTER.format(layer=layer)
        public = float(public_router[layer].float().norm())
        norm = float(tensors[key].float().norm())
        if norm > ROUTER_NORM_LIMIT * max(public, 1e-6):
            raise FlexMoEError(
                path,
                f"tensor {key} has norm {norm:.3g}, over {ROUTER_NORM_LIMIT:g} times the "
                f"public row's ({public:.3g})",
            )
        for proj in names.PROJECTIONS:
            key = PKG_PROJ.format(layer=layer, proj=proj)
            peak, bound = float(tensors[key].float().abs().max()), scales[(layer, proj)]
            if peak > WEIGHT_LIMIT * bound:
                raise FlexMoEError(
                    path,
                    f"tensor {key} reaches {peak:.3g}, over {WEIGHT_LIMIT:g} times the "
                    f"anchor's largest ({bound:.3g})",
                )


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
                where,
                f"tensor {key} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                f"expected {shapes.dtype}",
            )
        if not torch.isfinite(tensor).all():
            raise FlexMoEError(where, f"tensor {key} holds NaN or Inf values")
    for layer in range(shapes.num_layers):
        if tensors[PKG_BIAS.format(layer=layer)].item() > 0:
            raise FlexMoEError(
                where, f"tensor {PKG_BIAS.format(layer=layer)} is positive; biases are <= 0"
            )


def check_against_anchor(path: Path, manifest: ExpertManifest, anchor: AnchorInfo) -> None:
    """The package was trained on this very anchor and tokenizer, with matching shapes."""
    check_compatible(
        path,
        manifest,
        anchor_fingerprint=anchor.manifest.fingerprint,
        tokenizer_fingerprint=anchor.manifest.tokenizer_fingerprint,
        config=anchor.config,
        dtype=anchor.dtype,
        router_init=anchor.manifest.router_init.method,
    )


def check_compatible(
    path: Path,
    manifest: ExpertManifest,
    *,
    anchor_fingerprint: str,
    tokenizer_fingerprint: str,
    config: PretrainedConfig,
    dtype: torch.dtype,
    router_init: str | None = None,
) -> None:
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
    method = manifest.router_init.method
    if router_init is not None and method not in (router_init, "random"):
        raise FlexMoEError(path, f"router rows made with {method}, the anchor's with {router_init}")
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


def rival_version(manifest_sha256: str) -> str:
    """What an expert trained against a rival records of it: the first 16 hex digits of the
    sha256 of the rival's manifest (which pins its tensors' sha256)."""
    return manifest_sha256[:16]


def rival_versions(paths: Sequence[Path]) -> dict[str, str]:
    """Each rival package's name and version, from its manifest alone."""
    found = {}
    for path in paths:
        raw, manifest = _read_manifest(path)
        found[manifest.name] = rival_version(hashlib.sha256(raw).hexdigest())
    return found


def rival_mismatch(manifest: ExpertManifest, shipped: Mapping[str, str]) -> str | None:
    """Why the expert of ``manifest`` was not trained against the rivals ``shipped`` (name to
    version), or None."""
    used = manifest.training.hyperparameters
    names = [n for n in str(used.get("rivals") or "").split(",") if n]
    versions = [v for v in str(used.get("rival_manifests") or "").split(",") if v]
    if sorted(names) != sorted(shipped):
        return (
            f"trained against rivals [{', '.join(names)}], the anchor ships [{', '.join(shipped)}]"
        )
    for name, version in zip(names, versions, strict=False):  # older packages record none
        if shipped[name] != version:
            return f"trained against another version of the rival {name!r} than the anchor ships"
    return None


def trained_rivals(anchor: Anchor, package: ExpertPackage) -> list[ExpertPackage]:
    """The coordinator's rival packages ``package`` was trained against (its manifest names
    them and their versions), read from the anchor's ``rivals/`` folder."""
    named = str(package.manifest.training.hyperparameters.get("rivals") or "")
    paths = [Path(anchor.path) / RIVALS_DIR / name for name in filter(None, named.split(","))]
    for path in paths:
        if not (path / MANIFEST_FILE).is_file():
            raise FlexMoEError(
                package.path,
                f"trained against the rival {path.name!r}, which the anchor does not ship",
            )
    rivals = [load_package(path, anchor) for path in paths]
    versions = {r.manifest.name: rival_version(r.manifest_sha256) for r in rivals}
    why = rival_mismatch(package.manifest, versions) if rivals else None
    if why is not None:
        raise FlexMoEError(package.path, why)
    return rivals


def build_specialist(
    anchor: Anchor, package: ExpertPackage, *, use_bias: bool = True
) -> FlexOlmoForCausalLM:
    """The owner's model as it was trained: the anchor (slot 0) plus this expert (slot 1),
    top-2 of 2; or, for an expert trained against the coordinator's rivals, those as slots
    2.. at the top-k it was trained at."""
    rivals = trained_rivals(anchor, package)
    count = 2 + len(rivals)
    trained_k = int(package.manifest.training.hyperparameters.get("rival_top_k") or 2)
    model = upcycle(anchor.model, num_experts=count, top_k=min(count, max(2, trained_k)))
    with torch.no_grad():
        for layer, moe in enumerate(moe_layers(model)):
            moe.use_bias = use_bias
            moe.router.rows[0].copy_(anchor.public_router[layer])
            for slot, member in enumerate([package, *rivals], start=1):
                moe.router.rows[slot].copy_(member.tensors[PKG_ROUTER.format(layer=layer)])
                moe.router.biases[slot - 1].copy_(member.tensors[PKG_BIAS.format(layer=layer)])
                for proj in names.PROJECTIONS:
                    getattr(moe.experts[slot], proj).weight.copy_(
                        member.tensors[PKG_PROJ.format(layer=layer, proj=proj)]
                    )
    return model.eval()


def sign_package(package_dir: Path, key: Ed25519PrivateKey) -> Signature:
    """Sign the package's manifest and write ``signature.json`` (temporary file, then rename)."""
    signature = sign_manifest(read_bounded(Path(package_dir) / MANIFEST_FILE), key)
    write_json(Path(package_dir) / SIGNATURE_FILE, signature.model_dump())
    return signature
