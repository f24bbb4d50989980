"""Held-out loss, perplexity and bits per byte of a model, per domain.

Every token of the EOS-separated test stream after the first is predicted exactly once (full
blocks, then the tail). Bits per byte = total negative log-likelihood in bits over the documents'
UTF-8 bytes, which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from flexmoe.data.documents import DataSpec, Document
from flexmoe.data.packing import TokenStream, pack_documents
from flexmoe.data.split import Split, SplitFractions, load_splits
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.device import autocast
from flexmoe.errors import FlexMoEError
from flexmoe.evaluate.mixed import HeldOutText
from flexmoe.inference.selection import Selection, load_selected
from flexmoe.io import show_progress
from flexmoe.merge.layout import APPLY_BIAS


@dataclass(frozen=True)
class DomainScore:
    domain: str
    split: str
    documents: int
    tokens: int
    bytes: int
    loss: float
    perplexity: float
    bits_per_byte: float


@torch.no_grad()
def stream_nll(
    model: torch.nn.Module,
    stream: TokenStream,
    *,
    seq_len: int,
    batch_size: int = 8,
    device: torch.device,
    desc: str | None = None,
) -> tuple[float, int]:
    """Total negative log-likelihood (nats) and the number of predicted tokens.

    With ``desc``, a progress bar of that name shows the blocks done.
    """
    model.eval()
    total, count = 0.0, 0
    blocks = stream.num_blocks(seq_len)
    starts = range(0, blocks, batch_size)
    for start in tqdm(
        starts, desc=desc, unit="batch", disable=desc is None or not show_progress(), leave=False
    ):
        batch = stream.batch(list(range(start, min(blocks, start + batch_size))), seq_len)
        total_b, count_b = _nll(model, batch.to(device), device)
        total, count = total + total_b, count + count_b
    tail = torch.from_numpy(stream.tokens[blocks * seq_len :].astype("int64"))
    if len(tail) > 1:
        total_t, count_t = _nll(model, tail[None].to(device), device)
        total, count = total + total_t, count + count_t
    return total, count


def _nll(model: torch.nn.Module, batch: torch.Tensor, device: torch.device) -> tuple[float, int]:
    with autocast(device):
        logits = model(input_ids=batch[:, :-1]).logits  # (B, L, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
    return loss.item(), batch[:, 1:].numel()


def evaluate_model(
    model_dir: Path,
    data: list[DataSpec],
    *,
    split: Split = Split.TEST,
    device: torch.device,
    cache_dir: Path | None,
    seq_len: int | None = None,
    fractions: SplitFractions | None = None,
    batch_size: int = 8,
    selection: Selection | None = None,
    use_bias: bool = APPLY_BIAS,
) -> list[DomainScore]:
    """Score a model directory on the ``split`` documents of each domain.

    A merged model is loaded with its owners' biases (``use_bias``) and scored with the
    experts that ``selection`` and the owners' standing choice leave active.
    """
    model = load_selected(model_dir, selection, use_bias=use_bias)
    tokenizer = load_tokenizer(model_dir)
    return evaluate_loaded(
        model,
        tokenizer,
        data,
        split=split,
        device=device,
        cache_dir=cache_dir,
        seq_len=seq_len,
        fractions=fractions,
        batch_size=batch_size,
    )


def eval_documents(
    spec: DataSpec,
    split: Split = Split.TEST,
    fractions: SplitFractions | None = None,
    max_documents: int | None = None,
    max_bytes: int | None = None,
) -> list[Document]:
    """The ``split`` documents of a domain in the split's stable order: the first
    ``max_documents``, then cut after ``max_bytes`` bytes of text (the last one shortened), so
    that every model is scored on exactly the same text."""
    docs = load_splits([spec], fractions).get(split)[:max_documents]
    if not docs:
        raise FlexMoEError(
            ",".join(spec.paths), f"domain {spec.domain!r} has no documents in the {split} split"
        )
    return first_bytes(docs, max_bytes)


def first_bytes(docs: list[Document], max_bytes: int | None) -> list[Document]:
    """The documents in order, cut after ``max_bytes`` bytes of text (the last one shortened)."""
    if max_bytes is None:
        return docs
    kept: list[Document] = []
    left = max_bytes
    for doc in docs:
        size = len(doc.text.encode("utf-8"))
        if size > left:
            text = doc.text.encode("utf-8")[:left].decode("utf-8", errors="ignore")
            if text:
                kept.append(replace(doc, text=text))
            break
        kept.append(doc)
        left -= size
    return kept


def eval_seq_len(config: Any) -> int:
    """The block length held-out text is scored in when none is given."""
    return min(1024, int(config.max_position_embeddings))


@dataclass(frozen=True)
class DocumentRouted:
    """Several models and a rule that sends each document, as a whole, to one of them."""

    members: list[PreTrainedModel]
    route: Callable[[list[str]], list[int]]  # texts -> index of a member, one per text

    @property
    def config(self) -> PretrainedConfig:
        return self.members[0].config


Scoreable = torch.nn.Module | DocumentRouted


def evaluate_loaded(
    model: Scoreable,
    tokenizer: PreTrainedTokenizerBase,
    data: list[DataSpec] | list[DataSpec | HeldOutText],
    *,
    split: Split = Split.TEST,
    device: torch.device,
    cache_dir: Path | None,
    seq_len: int | None = None,
    fractions: SplitFractions | None = None,
    batch_size: int = 8,
    max_documents: int | None = None,
    max_bytes: int | None = None,
) -> list[DomainScore]:
    """Score an in-memory model on the ``split`` documents of each domain (see
    :func:`eval_documents` for ``max_documents`` and ``max_bytes``).

    A :class:`DocumentRouted` model scores each member on the documents routed to it; the
    domain's score sums over members. A :class:`HeldOutText` is scored on its own documents
    (the first ``max_bytes`` of them), whatever ``split`` says.
    """
    members = model.members if isinstance(model, DocumentRouted) else [model]
    for member in members:
        member.to(device)  # type: ignore[arg-type]
    config: Any = model.config
    seq_len = seq_len or eval_seq_len(config)
    scores = []
    for spec in data:
        if isinstance(spec, HeldOutText):
            docs = first_bytes(list(spec.documents[:max_documents]), max_bytes)
            if not docs:
                raise FlexMoEError(spec.domain, "no held-out documents to score")
        else:
            docs = eval_documents(spec, split, fractions, max_documents, max_bytes)
        if isinstance(model, DocumentRouted):
            choice = model.route([d.text for d in docs])
            groups = [
                (member, [d for d, c in zip(docs, choice, strict=True) if c == i])
                for i, member in enumerate(members)
            ]
        else:
            groups = [(model, docs)]
        nll, tokens, num_bytes = 0.0, 0, 0
        for member, group in groups:
            if not group:
                continue
            stream = pack_documents(group, tokenizer, cache_dir=cache_dir)
            nll_g, tokens_g = stream_nll(
                member,
                stream,
                seq_len=seq_len,
                batch_size=batch_size,
                device=device,
                desc=f"eval {spec.domain}",
            )
            nll, tokens, num_bytes = nll + nll_g, tokens + tokens_g, num_bytes + stream.num_bytes
        loss = nll / tokens
        score = DomainScore(
            domain=spec.domain,
            split=str(split),
            documents=len(docs),
            tokens=tokens,
            bytes=num_bytes,
            loss=loss,
            perplexity=math.exp(loss),
            bits_per_byte=nll / (math.log(2) * num_bytes),
        )
        scores.append(score)
    return scores


def format_table(scores: list[DomainScore]) -> str:
    """A fixed-width table of scores, one domain per row."""
    header = (
        f"{'domain':<12} {'split':<10} {'docs':>6} {'tokens':>9} {'loss':>7} {'ppl':>9} {'bpb':>7}"
    )
    lines = [header, "-" * len(header)]
    for s in scores:
        lines.append(
            f"{s.domain:<12} {s.split:<10} {s.documents:>6} {s.tokens:>9} "
            f"{s.loss:>7.4f} {s.perplexity:>9.2f} {s.bits_per_byte:>7.4f}"
        )
    return "\n".join(lines)
