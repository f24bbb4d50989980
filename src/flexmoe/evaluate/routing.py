"""Which experts each domain's text is routed to: the routing-share matrix (domain x expert)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flexmoe.data.documents import DataSpec
from flexmoe.data.packing import pack_documents
from flexmoe.data.split import Split
from flexmoe.device import autocast
from flexmoe.evaluate.perplexity import eval_documents
from flexmoe.inference.attribution import record_routing


@torch.no_grad()
def routing_matrix(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: list[DataSpec],
    experts: list[str],
    *,
    device: torch.device,
    cache_dir: Path | None,
    seq_len: int = 128,
    batch_size: int = 8,
    split: Split = Split.TEST,
    max_documents: int | None = None,
    max_bytes: int | None = None,
) -> dict[str, dict[str, float]]:
    """For each domain, each expert's share of the routing mass over the domain's held-out
    tokens (averaged over layers; shares of one domain sum to 1)."""
    model.to(device).eval()  # type: ignore[arg-type]
    matrix: dict[str, dict[str, float]] = {}
    for spec in data:
        docs = eval_documents(spec, split, None, max_documents, max_bytes)
        stream = pack_documents(docs, tokenizer, cache_dir=cache_dir)
        total = torch.zeros(len(experts), dtype=torch.float64)
        blocks = stream.num_blocks(seq_len)
        batches = [
            stream.batch(list(range(start, min(blocks, start + batch_size))), seq_len)[:, :-1]
            for start in range(0, blocks, batch_size)
        ] or [torch.from_numpy(stream.tokens.astype("int64"))[None]]  # shorter than one block
        with record_routing(model) as record:
            for batch in batches:
                batch = batch.to(device)
                with autocast(device):
                    model(input_ids=batch)
                total += record.calls[-1].reshape(-1, len(experts)).double().sum(0)
                record.calls.clear()
        mass = total / total.sum().clamp(min=1e-12)
        matrix[spec.domain] = {
            name: float(share) for name, share in zip(experts, mass, strict=True)
        }
    return matrix
