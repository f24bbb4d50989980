"""Check a package against its anchor, and score the owner's 2-expert specialist."""

from __future__ import annotations

from pathlib import Path

from flexmoe.anchor import open_anchor
from flexmoe.expert.manifest import PrivacyRecord
from flexmoe.expert.package import load_package
from flexmoe.expert.registry import KeyRegistry


def verify_package(
    package_dir: Path, anchor_dir: Path, registry_path: Path | None = None
) -> list[tuple[str, str]]:
    """Every check of :func:`load_package` against the anchor (and the key registry at
    ``registry_path``); a summary, row by row.

    Raises :class:`~flexmoe.errors.FlexMoEError` at the first failed check.
    """
    anchor = open_anchor(anchor_dir)  # fingerprints checked; no model needed
    if registry_path is None:
        package = load_package(package_dir, anchor)
    else:
        with KeyRegistry(registry_path) as registry:
            package = load_package(package_dir, anchor, registry)
    m, signer = package.manifest, package.signer
    if signer is None:
        signed = "unsigned" + (" (the registry takes unsigned packages)" if registry_path else "")
    elif signer.owner is None:
        signed = f"key {signer.fingerprint[:16]}...: valid (no --registry: key not checked)"
    else:
        signed = f"key {signer.fingerprint[:16]}... of {signer.owner}: valid, registered, live"
    params = sum(t.numel() for t in package.tensors.values())
    return [
        ("name", m.name),
        ("owner", m.owner),
        ("license", m.license),
        ("created", m.created),
        ("schema", f"version {m.schema_version}: ok"),
        ("file hashes", f"{len(m.files)} file(s): ok"),
        ("signature", signed),
        ("anchor fingerprint", f"{m.anchor_fingerprint[:16]}...: matches"),
        ("tokenizer fingerprint", f"{m.tokenizer_fingerprint[:16]}...: matches"),
        (
            "tensors",
            f"{len(package.tensors)} tensors, {params:,} parameters, {m.shapes.dtype}, finite",
        ),
        ("router init", m.router_init.method),
        ("training", f"{m.training.steps} steps, {m.training.tokens:,} tokens"),
        ("privacy", _privacy(m.training.privacy)),
        (
            "final losses",
            f"train {m.training.final_train_loss:.4f}, validation {m.training.final_val_loss}",
        ),
    ]


def _privacy(record: PrivacyRecord | None) -> str:
    """The DP record (its epsilon was recomputed by the accountant when the package loaded)."""
    if record is None:
        return "none (not trained with differential privacy)"
    return (
        f"DP-SGD: epsilon {record.epsilon:.3g} at delta {record.delta:g} per block of "
        f"{record.unit_tokens} tokens (noise {record.noise_multiplier:.3g}, clip "
        f"{record.max_grad_norm:g}, {record.steps} steps at rate {record.sample_rate:.3g})"
    )
