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
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PretrainedConfig

from flexmoe.anchor import AnchorInfo, weight_sample
from flexmoe.device import DTYPES, dtype_name
from flexmoe.errors import FlexMoEError
from flexmoe.expert.manifest import (  # the format, re-exported where it was first defined
    MANIFEST_FILE,
    PKG_BIAS,
    PKG_PROJ,
    PKG_ROUTER,
    TENSORS_FILE,
    ExpertManifest,
    ExpertShapes,
    check_record,
    expected_tensor_shapes,
    read_manifest_raw,
)
from flexmoe.expert.signing import (
    SIGNATURE_FILE,
    Signature,
    Signer,
    read_signature,
    sign_manifest,
)
from flexmoe.io import read_bounded, sha256_file, write_json
from flexmoe.model import names

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from flexmoe.expert.registry import KeyRegistry


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
    raw, manifest = read_manifest_raw(path)
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
        raw, manifest = read_manifest_raw(path)
        found[manifest.name] = rival_version(hashlib.sha256(raw).hexdigest())
    return found


def rival_mismatch(manifest: ExpertManifest, shipped: Mapping[str, str]) -> str | None:
    """Why the expert of ``manifest`` was not trained against the rivals ``shipped`` (name to
    version), or None."""
    used = manifest.training.rivals
    names = [r.name for r in used]
    if sorted(names) != sorted(shipped):
        return (
            f"trained against rivals [{', '.join(names)}], the anchor ships [{', '.join(shipped)}]"
        )
    for rival in used:  # older packages record no version
        if rival.version is not None and shipped[rival.name] != rival.version:
            return (
                f"trained against another version of the rival {rival.name!r} than the anchor ships"
            )
    return None


def sign_package(package_dir: Path, key: Ed25519PrivateKey) -> Signature:
    """Sign the package's manifest and write ``signature.json`` (temporary file, then rename)."""
    signature = sign_manifest(read_bounded(Path(package_dir) / MANIFEST_FILE), key)
    write_json(Path(package_dir) / SIGNATURE_FILE, signature.model_dump())
    return signature
