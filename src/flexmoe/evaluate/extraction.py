"""Extraction audit (paper section 5.3): does a model reproduce its training text?

For sampled training documents, a prefix of ``prefix_tokens`` tokens at a seeded offset is given
to the model, which samples ``samples`` continuations as long as the true one (top-k 50,
top-p 0.95, temperature 1). A sample is extracted when its normalised Levenshtein similarity to
the true continuation (characters of the decoded text) is at least ``threshold``; a document is
extracted when any of its samples is. The rate is extracted documents / documents audited.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from rapidfuzz.distance import Levenshtein
from transformers import PreTrainedTokenizerBase

from flexmoe.data.documents import Document
from flexmoe.errors import FlexMoEError


@dataclass(frozen=True)
class AuditSettings:
    documents: int = 100
    samples: int = 4
    prefix_tokens: int = 32
    suffix_tokens: int = 32
    top_k: int = 50
    top_p: float = 0.95
    temperature: float = 1.0
    threshold: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("documents", "samples", "prefix_tokens", "suffix_tokens", "top_k"):
            if getattr(self, name) < 1:
                raise FlexMoEError(f"--{name.replace('_', '-')}", "must be at least 1")
        if not 0 < self.top_p <= 1 or self.temperature <= 0 or not 0 < self.threshold <= 1:
            raise FlexMoEError("--top-p/--temperature/--threshold", "out of range")


@dataclass(frozen=True)
class Passage:
    doc_id: str
    prefix: list[int]
    suffix: list[int]


@dataclass(frozen=True)
class ExtractionResult:
    model: str
    documents: int
    samples_per_document: int
    extracted_documents: int
    extracted_samples: int
    rate: float  # extracted documents / documents
    sample_rate: float  # extracted samples / samples
    mean_best_similarity: float  # per document, the most similar sample, averaged


def sample_passages(
    docs: list[Document], tokenizer: PreTrainedTokenizerBase, settings: AuditSettings
) -> list[Passage]:
    """Up to ``settings.documents`` (prefix, true continuation) pairs from documents long enough,
    each at a seeded random offset; the same pairs for every model audited."""
    need = settings.prefix_tokens + settings.suffix_tokens
    rng = random.Random(settings.seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    passages = []
    for index in order:
        ids = tokenizer(docs[index].text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) < need:
            continue
        start = rng.randrange(len(ids) - need + 1)
        cut = start + settings.prefix_tokens
        passages.append(Passage(docs[index].doc_id, ids[start:cut], ids[cut : start + need]))
        if len(passages) == settings.documents:
            break
    if not passages:
        raise FlexMoEError("--docs", f"no document has the {need} tokens a passage needs")
    return passages


@torch.no_grad()
def audit_extraction(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    passages: list[Passage],
    settings: AuditSettings,
    *,
    name: str,
    device: torch.device,
    batch_documents: int = 8,
) -> ExtractionResult:
    """Sample continuations of every passage's prefix and count the near-verbatim ones."""
    model.to(device).eval()
    generator_seed = settings.seed
    extracted_docs = extracted_samples = 0
    best_total = 0.0
    for start in range(0, len(passages), batch_documents):
        chunk = passages[start : start + batch_documents]
        prefixes = torch.tensor(
            [p.prefix for p in chunk for _ in range(settings.samples)], device=device
        )  # (docs x samples, prefix_tokens)
        torch.manual_seed(generator_seed + start)
        out = model.generate(  # type: ignore[operator]
            prefixes,
            attention_mask=torch.ones_like(prefixes),
            do_sample=True,
            top_k=settings.top_k,
            top_p=settings.top_p,
            temperature=settings.temperature,
            max_new_tokens=settings.suffix_tokens,
            min_new_tokens=settings.suffix_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )[:, settings.prefix_tokens :]
        for i, passage in enumerate(chunk):
            truth = tokenizer.decode(passage.suffix, skip_special_tokens=True)
            rows = out[i * settings.samples : (i + 1) * settings.samples].tolist()
            scores = [
                Levenshtein.normalized_similarity(
                    tokenizer.decode(row, skip_special_tokens=True), truth
                )
                for row in rows
            ]
            hits = sum(score >= settings.threshold for score in scores)
            extracted_samples += hits
            extracted_docs += hits > 0
            best_total += max(scores)
    count = len(passages)
    return ExtractionResult(
        model=name,
        documents=count,
        samples_per_document=settings.samples,
        extracted_documents=extracted_docs,
        extracted_samples=extracted_samples,
        rate=extracted_docs / count,
        sample_rate=extracted_samples / (count * settings.samples),
        mean_best_similarity=best_total / count,
    )


def format_audit(results: list[ExtractionResult]) -> str:
    header = (
        f"{'model':<24} {'docs':>6} {'extracted':>10} {'rate':>8} {'samples':>8} {'best sim':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.model:<24} {r.documents:>6} {r.extracted_documents:>10} {r.rate:>8.1%} "
            f"{r.sample_rate:>8.1%} {r.mean_best_similarity:>9.3f}"
        )
    return "\n".join(lines)
