"""Exact-duplicate removal and a deterministic train / validation / test split."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum

from flexmoe.data.documents import DataSpec, Document, read_documents
from flexmoe.errors import FlexMoEError


class Split(StrEnum):
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


@dataclass(frozen=True)
class SplitFractions:
    """Fractions of documents per split; they must sum to 1."""

    train: float = 0.90
    validation: float = 0.05
    test: float = 0.05

    def __post_init__(self) -> None:
        values = (self.train, self.validation, self.test)
        if any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-9:
            raise FlexMoEError("--split", f"fractions must be >= 0 and sum to 1, got {values}")


@dataclass
class SplitDocuments:
    """Documents of one or more domains assigned to splits."""

    train: list[Document] = field(default_factory=list)
    validation: list[Document] = field(default_factory=list)
    test: list[Document] = field(default_factory=list)

    def get(self, split: Split) -> list[Document]:
        return {Split.TRAIN: self.train, Split.VALIDATION: self.validation, Split.TEST: self.test}[
            split
        ]


def deduplicate(docs: list[Document]) -> list[Document]:
    """Drop documents whose text exactly repeats an earlier one, keeping first occurrences."""
    seen: set[str] = set()
    kept = []
    for doc in docs:
        digest = doc.text_sha256
        if digest not in seen:
            seen.add(digest)
            kept.append(doc)
    return kept


def split_of(domain: str, doc_id: str, fractions: SplitFractions) -> Split:
    """The split of a document: a hash of (domain, id) mapped to [0, 1)."""
    digest = hashlib.sha256(f"{domain}\x00{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions.train:
        return Split.TRAIN
    if u < fractions.train + fractions.validation:
        return Split.VALIDATION
    return Split.TEST


def split_documents(
    docs: list[Document], fractions: SplitFractions | None = None
) -> SplitDocuments:
    """Deduplicate, then assign each document to a split; order within a split is by id."""
    fractions = fractions or SplitFractions()
    out = SplitDocuments()
    for doc in deduplicate(docs):
        out.get(split_of(doc.domain, doc.doc_id, fractions)).append(doc)
    for part in (out.train, out.validation, out.test):
        part.sort(key=lambda d: (d.domain, d.doc_id, d.text_sha256))
    return out


def load_splits(specs: list[DataSpec], fractions: SplitFractions | None = None) -> SplitDocuments:
    """Read, deduplicate and split the documents of one or more domains."""
    return split_documents([doc for spec in specs for doc in read_documents(spec)], fractions)
