"""Mean hidden state entering each layer's feed-forward over a set of documents.

This is the ``anchor-hidden`` domain embedding: the public router row r_0 is computed from public
documents when the anchor is built, and an owner's r_1 the same way from its own documents.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flexmoe.device import autocast, on_device
from flexmoe.errors import FlexMoEError


def mean_ffn_inputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_tokens: int = 256,
    batch_size: int = 8,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``(layers, hidden)``: per layer, the mean over documents of each document's mean
    feed-forward input (the residual stream after attention)."""
    per_doc = document_ffn_inputs(
        model, tokenizer, texts, max_tokens=max_tokens, batch_size=batch_size, device=device
    )  # (D, layers, hidden)
    return per_doc.double().mean(0).float()


@torch.no_grad()
def document_ffn_inputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_tokens: int = 256,
    batch_size: int = 8,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``(documents, layers, hidden)``: each document's mean feed-forward input per layer, over
    its first ``max_tokens`` tokens, computed on ``device`` (the model is moved there for the
    call and back after; default: where the model is)."""
    if not texts:
        raise FlexMoEError(None, "no documents to compute router vectors from")
    layers = list(model.model.layers)  # type: ignore[union-attr, arg-type]
    captured: list[torch.Tensor | None] = [None] * len(layers)
    found: list[torch.Tensor] = []

    def hook_for(i: int):  # type: ignore[no-untyped-def]
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured[i] = args[0]

        return hook

    handles = [layer.mlp.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    with on_device(model, device) as where:
        try:
            for start in range(0, len(texts), batch_size):
                chunk = list(texts[start : start + batch_size])
                enc = tokenizer(
                    chunk,
                    add_special_tokens=False,
                    truncation=True,
                    max_length=max_tokens,
                    padding=True,
                    return_tensors="pt",
                )
                ids = enc["input_ids"].to(where)  # (B, T)
                mask = enc["attention_mask"].to(where)  # (B, T)
                with autocast(where):
                    model(input_ids=ids, attention_mask=mask)
                weights = mask.float() / mask.sum(1, keepdim=True).clamp(min=1)  # (B, T)
                per_layer = [
                    torch.einsum("bt,bth->bh", weights, h.float())  # (B, H)
                    for h in captured
                    if h is not None
                ]
                found.append(torch.stack(per_layer, dim=1).cpu())  # (B, layers, H)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
    return torch.cat(found)


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit L2 norm: a router row sets a direction, not a temperature."""
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
