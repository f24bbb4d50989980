"""Generation with an expert selection, returning the text and its attribution."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flexmoe.errors import FlexMoEError
from flexmoe.inference.attribution import record_routing
from flexmoe.inference.selection import Selection, set_expert_mask
from flexmoe.merge.slots import SlotInfo


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    prompt_shares: dict[str, float]  # expert name -> share of routing mass over the prompt
    generated_shares: dict[str, float]  # ... over the generated tokens
    per_token: list[dict[str, float]] | None = None  # one row per token, prompt then generated


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    slots: list[SlotInfo],
    selection: Selection | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    per_token: bool = False,
) -> GenerationResult:
    """Sample a continuation of ``prompt`` from the selected experts; say who contributed."""
    if max_new_tokens < 1:
        raise FlexMoEError("--max-new-tokens", "must be at least 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise FlexMoEError("--temperature/--top-p", "temperature >= 0 and 0 < top-p <= 1")
    device = next(model.parameters()).device
    ids = [tokenizer.eos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    limit = int(model.config.max_position_embeddings)
    if len(ids) + max_new_tokens > limit:
        raise FlexMoEError(
            "prompt", f"{len(ids)} tokens + {max_new_tokens} new exceed the context of {limit}"
        )
    mask = (selection or Selection()).mask(slots)
    set_expert_mask(model, mask)
    torch.manual_seed(seed)
    try:
        with record_routing(model) as record:
            out = model.generate(  # type: ignore[operator]
                torch.tensor([ids], device=device),
                max_new_tokens=max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature or None,
                top_p=top_p,
                top_k=0,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
    finally:
        set_expert_mask(model, None)
    new = out[0, len(ids) :].tolist()
    names = [s.name for s in slots]

    def as_dict(shares: torch.Tensor) -> dict[str, float]:
        return (
            {n: float(v) for n, v in zip(names, shares[0], strict=True)} if shares.numel() else {}
        )

    rows = None
    if per_token:
        rows = [as_dict(t[None]) for t in record.per_token()[0]]
    return GenerationResult(
        text=str(tokenizer.decode(new, skip_special_tokens=True)),
        prompt_tokens=len(ids),
        new_tokens=len(new),
        prompt_shares=as_dict(record.shares(slice(0, 1))),
        generated_shares=as_dict(record.shares(slice(1, None))),
        per_token=rows,
    )


def format_attribution(result: GenerationResult, slots: list[SlotInfo]) -> str:
    header = f"{'expert':<16} {'owner':<28} {'prompt':>8} {'generated':>10}"
    lines = [header, "-" * len(header)]
    for s in slots:
        p = result.prompt_shares.get(s.name, 0.0)
        g = result.generated_shares.get(s.name, 0.0)
        lines.append(f"{s.name:<16} {s.owner:<28} {p:>8.1%} {g:>10.1%}")
    return "\n".join(lines)
