"""Held-out text that needs two experts: documents made of alternating passages of two domains.

On one domain's text, Branch-Train-Merge equals that owner's specialist by construction; the
merged model's per-token routing can only win where a document needs several experts at once.
:func:`alternating` builds such documents from two domains' held-out (test split) documents, so
that no model has trained on any of it, and every model is scored on them like on a domain.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from flexmoe.data.documents import Document

PASSAGE_BYTES = 512
PASSAGES_PER_DOCUMENT = 6


@dataclass(frozen=True)
class HeldOutText:
    """Held-out documents given as they are (not read and split from files), scored under the
    name ``domain`` like a domain's test split."""

    domain: str
    documents: tuple[Document, ...]


def mixture_name(first: str, second: str) -> str:
    return f"{first}+{second}"


def passages(docs: list[Document], size: int) -> Iterator[str]:
    """The documents' text in passages of whole lines, each at least ``size`` bytes (a document's
    last one may be shorter) and never spanning two documents."""
    for doc in docs:
        lines: list[str] = []
        length = 0
        for line in doc.text.splitlines(keepends=True):
            lines.append(line)
            length += len(line.encode("utf-8"))
            if length >= size:
                yield "".join(lines)
                lines, length = [], 0
        if "".join(lines).strip():
            yield "".join(lines)


def alternating(
    first: str,
    first_docs: list[Document],
    second: str,
    second_docs: list[Document],
    *,
    passage_bytes: int = PASSAGE_BYTES,
    per_document: int = PASSAGES_PER_DOCUMENT,
) -> HeldOutText:
    """Documents of ``per_document`` passages taken in turn from ``first_docs`` and
    ``second_docs`` (first, second, first, ...), until either runs out."""
    name = mixture_name(first, second)
    sources = (passages(first_docs, passage_bytes), passages(second_docs, passage_bytes))
    documents: list[Document] = []
    while True:
        parts = [next(sources[i % 2], None) for i in range(per_document)]
        if any(p is None for p in parts):
            break
        text = "".join(p if p.endswith("\n") else p + "\n" for p in parts if p is not None)
        documents.append(Document(domain=name, doc_id=f"{name}:{len(documents)}", text=text))
    return HeldOutText(name, tuple(documents))
