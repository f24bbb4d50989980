"""Held-out loss, perplexity and bits per byte of a model, per domain.

Every token of the EOS-separated test stream after the first is predicted exactly once (full
blocks, then the tail). Bits per byte = total negative log-likelihood in bits over the documents'
UTF-8 bytes, which makes models with different tokenizers comparable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flexmoe.data.documents import DataSpec
from flexmoe.data.packing import TokenStream, pack_documents
from flexmoe.data.split import Split, SplitFractions, load_splits
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.device import autocast
from flexmoe.errors import FlexMoEError
from flexmoe.inference.selection import Selection, current_mask, set_expert_mask
from flexmoe.merge.build import APPLY_BIAS, SLOTS_FILE, load_merged
from flexmoe.merge.slots import read_slots
from flexmoe.model.checkpoint import load_model


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def stream_nll(
    model: PreTrainedModel,
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
    for start in tqdm(starts, desc=desc, unit="batch", disable=desc is None, leave=False):
        batch = stream.batch(list(range(start, min(blocks, start + batch_size))), seq_len)
        total_b, count_b = _nll(model, batch.to(device), device)
        total, count = total + total_b, count + count_b
    tail = torch.from_numpy(stream.tokens[blocks * seq_len :].astype("int64"))
    if len(tail) > 1:
        total_t, count_t = _nll(model, tail[None].to(device), device)
        total, count = total + total_t, count + count_t
    return total, count


def _nll(model: PreTrainedModel, batch: torch.Tensor, device: torch.device) -> tuple[float, int]:
    with autocast(device):
        logits = model(input_ids=batch[:, :-1]).logits  # (B, L, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
    return loss.item(), batch[:, 1:].numel()


def score_stream(
    model: PreTrainedModel,
    stream: TokenStream,
    *,
    domain: str,
    split: str,
    seq_len: int,
    device: torch.device,
    batch_size: int = 8,
) -> DomainScore:
    nll, tokens = stream_nll(
        model, stream, seq_len=seq_len, batch_size=batch_size, device=device, desc=f"eval {domain}"
    )
    loss = nll / tokens
    return DomainScore(
        domain=domain,
        split=split,
        documents=stream.num_docs,
        tokens=tokens,
        bytes=stream.num_bytes,
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_byte=nll / (math.log(2) * stream.num_bytes),
    )


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
    model: PreTrainedModel
    if (Path(model_dir) / SLOTS_FILE).is_file():
        model = load_merged(model_dir, use_bias=use_bias)
        set_expert_mask(
            model, current_mask(model_dir, read_slots(model_dir), selection or Selection())
        )
    elif selection is not None:
        raise FlexMoEError(model_dir, "expert selection needs a merged model")
    else:
        model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    return evaluate_loaded(
        model, tokenizer, data, split=split, device=device, cache_dir=cache_dir, seq_len=seq_len,
        fractions=fractions, batch_size=batch_size,
    )  # fmt: skip


def evaluate_loaded(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: list[DataSpec],
    *,
    split: Split = Split.TEST,
    device: torch.device,
    cache_dir: Path | None,
    seq_len: int | None = None,
    fractions: SplitFractions | None = None,
    batch_size: int = 8,
    max_documents: int | None = None,
) -> list[DomainScore]:
    """Score an in-memory model on the ``split`` documents of each domain (the first
    ``max_documents`` of them, in the split's stable order, when given)."""
    model.to(device)  # type: ignore[arg-type]
    seq_len = seq_len or min(1024, int(model.config.max_position_embeddings))
    scores = []
    for spec in data:
        docs = load_splits([spec], fractions).get(split)[:max_documents]
        if not docs:
            raise FlexMoEError(
                ",".join(spec.paths),
                f"domain {spec.domain!r} has no documents in the {split} split",
            )
        stream = pack_documents(docs, tokenizer, cache_dir=cache_dir)
        score = score_stream(
            model, stream, domain=spec.domain, split=str(split), seq_len=seq_len,
            device=device, batch_size=batch_size,
        )  # fmt: skip
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
