"""Router-tuning proxies the paper's way (section 3.3.3): public documents that look like an
owner's data.

The owner, at home, fits a small classifier (own documents vs public documents) on the anchor's
mean feed-forward inputs and ranks the public corpus's training documents by it. Only the sha256
of the chosen PUBLIC documents leaves the owner (a ``proxies.json``); the coordinator resolves
those hashes against its own copy of the public corpus, so every document that tunes the router
is public text and nothing the owner wrote reaches the coordinator.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from flexmoe import __version__
from flexmoe.anchor import Anchor
from flexmoe.data.documents import Document
from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_write_bytes, read_manifest_model
from flexmoe.model.probe import document_ffn_inputs, unit_rows


class ProxyChoice(BaseModel):
    """What an owner sends for router tuning: hashes of public documents, nothing of its own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    kind: Literal["flexmoe-proxies"] = "flexmoe-proxies"
    expert: str
    anchor_fingerprint: str
    public_sha256: list[str] = Field(min_length=1)
    classifier: dict[str, float | int]  # how the public documents were ranked (no data)
    created: str
    flexmoe_version: str


def _features(anchor: Anchor, texts: list[str], device: torch.device) -> torch.Tensor:
    """``(D, layers * hidden)``: each document's unit-length mean feed-forward input per layer."""
    per_doc = document_ffn_inputs(anchor.model, anchor.tokenizer, texts, device=device)
    return unit_rows(per_doc).flatten(1)


def rank_public(
    anchor: Anchor,
    own: list[Document],
    public: list[Document],
    *,
    device: torch.device,
    steps: int = 300,
    weight_decay: float = 1e-3,
    max_documents: int = 1000,
) -> tuple[list[float], dict[str, float | int]]:
    """Score every public document by a logistic classifier's log-odds of "own, not public",
    trained on up to ``max_documents`` of each side (classes weighted equally)."""
    if not own or not public:
        raise FlexMoEError("--data", "ranking needs the owner's documents and public documents")
    x_own = _features(anchor, [d.text for d in own[:max_documents]], device)
    x_pub = _features(anchor, [d.text for d in public], device)
    x = torch.cat([x_own, x_pub[:max_documents]])
    y = torch.cat([torch.ones(len(x_own)), torch.zeros(min(len(x_pub), max_documents))])
    weight = torch.where(y > 0, 0.5 / len(x_own), 0.5 / (len(y) - len(x_own)))
    mean, scale = x.mean(0), x.std(0).clamp(min=1e-6)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        logits = ((x - mean) / scale) @ w + b
        loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * weight).sum()
        (loss + weight_decay * w.square().sum()).backward()
        opt.step()
    with torch.no_grad():
        scores = (((x_pub - mean) / scale) @ w + b).tolist()
        accuracy = float((((x - mean) / scale) @ w + b > 0).float().eq(y).float().mean())
    return scores, {
        "train_accuracy": round(accuracy, 4),
        "steps": steps,
        "own_documents": len(x_own),
        "public_documents": len(x_pub),
    }


def choose_proxies(
    anchor: Anchor,
    name: str,
    own: list[Document],
    public: list[Document],
    *,
    count: int,
    device: torch.device,
) -> ProxyChoice:
    """The ``count`` public documents that look most like the owner's, as hashes."""
    if count < 1:
        raise FlexMoEError("--count", "must be at least 1")
    scores, record = rank_public(anchor, own, public, device=device)
    order = sorted(range(len(public)), key=lambda i: -scores[i])[:count]
    return ProxyChoice(
        expert=name,
        anchor_fingerprint=anchor.manifest.fingerprint,
        public_sha256=[public[i].text_sha256 for i in order],
        classifier=record,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        flexmoe_version=__version__,
    )


def write_proxies(path: Path, choice: ProxyChoice) -> None:
    atomic_write_bytes(Path(path), (choice.model_dump_json(indent=2) + "\n").encode())


def read_proxies(path: Path) -> ProxyChoice:
    return read_manifest_model(Path(path), ProxyChoice)


def resolve_proxies(
    choice: ProxyChoice, public: list[Document], where: Path | str
) -> list[Document]:
    """The coordinator's own copies of the chosen public documents, relabelled with the
    expert's name; a hash that is not a public document is refused."""
    by_hash = {d.text_sha256: d for d in public}
    missing = [h for h in choice.public_sha256 if h not in by_hash]
    if missing:
        raise FlexMoEError(
            where,
            f"{len(missing)} hashes are not public documents (first {missing[0][:16]})",
        )
    return [
        Document(choice.expert, by_hash[h].doc_id, by_hash[h].text) for h in choice.public_sha256
    ]
