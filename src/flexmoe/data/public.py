"""The public corpus an anchor was made from, recorded in its manifest so that every owner's
expert mixes in the same public text by default (file paths, sizes and sha256; never the text).

An owner finds it where the coordinator's path says, or in ``ANCHOR/public/`` when the
coordinator ships the files with the anchor; each file must hash as recorded.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flexmoe.data.documents import DataSpec, expand_paths
from flexmoe.errors import FlexMoEError
from flexmoe.io import sha256_file

SHIPPED_DIR = "public"  # files the coordinator ships inside the anchor directory


class PublicFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str  # absolute, where the coordinator read it
    sha256: str
    bytes: int


class PublicCorpus(BaseModel):
    """Every file of the anchor's public documents, and how to read them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    files: tuple[PublicFile, ...]
    text_field: str = "text"
    id_field: str | None = None


def _files(specs: list[DataSpec]) -> list[Path]:
    return [f for spec in specs for p in spec.paths for f in expand_paths(p)]


def record_public_corpus(specs: list[DataSpec]) -> PublicCorpus:
    """The record of the documents in ``specs`` (read as the first spec says)."""
    files = tuple(
        PublicFile(path=str(f.resolve()), sha256=sha256_file(f), bytes=f.stat().st_size)
        for f in dict.fromkeys(_files(specs))
    )
    return PublicCorpus(files=files, text_field=specs[0].text_field, id_field=specs[0].id_field)


def find_public_corpus(anchor_dir: Path, corpus: PublicCorpus | None) -> list[DataSpec]:
    """The anchor's public corpus on this machine: each recorded file at its path or in
    ``ANCHOR/public/``, with the recorded sha256."""
    if corpus is None:
        raise FlexMoEError(
            "--public-data",
            f"the anchor {anchor_dir} records no public corpus; pass --public-data FILES "
            "(or --no-public-data, which costs the merged model quality)",
        )
    found = []
    for record in corpus.files:
        recorded = Path(record.path)
        shipped = Path(anchor_dir) / SHIPPED_DIR / recorded.name
        candidates = [p for p in (shipped, recorded) if p.is_file()]
        if not candidates:
            raise FlexMoEError(
                recorded,
                f"the anchor's public corpus file is not on this machine; copy it to "
                f"{shipped} or pass --public-data FILES",
            )
        match = next((p for p in candidates if sha256_file(p) == record.sha256), None)
        if match is None:
            raise FlexMoEError(
                candidates[0], f"differs from the anchor's public corpus (sha256 {record.sha256})"
            )
        found.append(str(match))
    return [DataSpec("public", tuple(found), corpus.text_field, corpus.id_field)]


def warn_if_other_corpus(given: list[DataSpec], corpus: PublicCorpus | None) -> None:
    """A warning when ``--public-data`` is not the public corpus the anchor records."""
    if corpus is None:
        return
    recorded = {f.sha256 for f in corpus.files}
    hashes = {sha256_file(f) for f in _files(given)}
    if hashes != recorded:
        warnings.warn(
            f"--public-data is not the anchor's public corpus ({len(hashes & recorded)} of "
            f"{len(recorded)} recorded files given, {len(hashes - recorded)} others); "
            "omit it to use the anchor's",
            stacklevel=2,
        )
