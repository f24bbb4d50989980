"""Batched sampling: several requests, each with its own expert selection, in one forward pass.

Prompts are left-padded into one batch; each row carries its own expert mask (``(B, N)``), its
own sampling settings and random generator, its own stop strings and token limit. A row that has
finished stops counting (its later tokens are discarded) and is reported at once through
``on_finish``, so a short answer does not wait for the longest one in its batch. A row whose own
work fails (its generator, its sampling, its callbacks) fails alone through ``on_error``; the
others go on.

Attribution per row: the routing mass (averaged over layers) at each position that produced a
generated token, i.e. the last prompt position and every generated token fed back but the last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flexmoe.inference.attribution import record_routing
from flexmoe.inference.selection import set_expert_mask


@dataclass
class RowRequest:
    """One request of a batch, already validated and tokenised."""

    prompt_ids: list[int]
    mask: torch.Tensor  # (N,) bool, True = the expert may answer
    max_tokens: int
    min_tokens: int = 0  # end-of-text is not sampled before this many tokens (as in vLLM)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None  # streamed text as it becomes final
    on_finish: Callable[[RowResult], None] | None = None
    on_error: Callable[[str], None] | None = None  # this row failed; the batch goes on
    cancelled: Callable[[], bool] | None = None  # asked before each token: stop the row now


@dataclass
class RowResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end of text or a stop string), "length" or "cancelled"
    expert_mass: list[float]  # per slot: routing mass summed over the generated tokens
    shares: list[float] = field(default_factory=list)  # per slot: share of that mass


class _Row:
    """The running state of one row: tokens so far, what has been streamed, whether done."""

    def __init__(self, req: RowRequest, tokenizer: PreTrainedTokenizerBase, num_experts: int):
        self.req, self.tokenizer = req, tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.done: str | None = None
        self.final: RowResult | None = None  # set once, when the row finishes
        self.mass = torch.zeros(num_experts, dtype=torch.float64)
        seed = req.seed if req.seed is not None else int(torch.seed() % (2**63))
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, token: int, eos: int | None, routing: torch.Tensor) -> None:
        """Take the sampled ``token``; ``routing`` (N,) is the mass at the position that made it."""
        if token == eos:
            self.done = "stop"
        else:
            self.tokens.append(token)
            self.mass += routing
            self.text = str(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
            cut = min((i for i in (self.text.find(s) for s in self.req.stop if s) if i >= 0),
                      default=-1)  # fmt: skip
            if cut >= 0:
                self.text, self.done = self.text[:cut], "stop"
            elif len(self.tokens) >= self.req.max_tokens:
                self.done = "length"
        self._stream()
        if self.done is not None:
            self.final = self.result()
            if self.req.on_finish is not None:
                self.req.on_finish(self.final)

    def _stream(self) -> None:
        """Send the text that can no longer change: all of it once done, else all but what
        could still turn out to be the start of a stop string (or a partial character)."""
        if self.req.on_text is None:
            return
        final = len(self.text)
        if self.done is None:
            hold = max((len(s) - 1 for s in self.req.stop), default=0)
            final = max(self.sent, len(self.text.rstrip("\ufffd")) - hold)
        if final > self.sent:
            self.req.on_text(self.text[self.sent : final])
            self.sent = final

    def cancel(self) -> None:
        """Stop this row where it is (its client left); ``on_finish`` hears it as cancelled."""
        self.done = "cancelled"
        self.final = self.result()
        if self.req.on_finish is not None:
            self.req.on_finish(self.final)

    def fail(self, error: Exception) -> None:
        """End this row with ``error``, told through ``on_error``; no result."""
        self.done, self.final = "error", None
        if self.req.on_error is not None:
            self.req.on_error(f"generation failed: {error}")

    def result(self) -> RowResult:
        total = float(self.mass.sum())
        shares = [float(m) / total if total > 0 else 0.0 for m in self.mass]
        return RowResult(
            text=self.text, token_ids=self.tokens, prompt_tokens=len(self.req.prompt_ids),
            finish_reason=self.done or "length", expert_mass=[float(m) for m in self.mass],
            shares=shares,
        )  # fmt: skip


def _sample(logits: torch.Tensor, row: _Row, eos: int | None) -> int:
    """One token from ``logits`` (V,) with the row's temperature, nucleus and ``min_tokens``."""
    if eos is not None and len(row.tokens) < row.req.min_tokens:
        logits = logits.clone()
        logits[eos] = float("-inf")
    if row.req.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / row.req.temperature, dim=-1)
    if row.req.top_p < 1.0:
        ordered, index = probs.sort(descending=True)
        keep = ordered.cumsum(0) - ordered < row.req.top_p  # always keeps the first
        probs = torch.zeros_like(probs).scatter(0, index[keep], ordered[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=row.generator))


def _new_row(req: RowRequest, tokenizer: PreTrainedTokenizerBase, num_experts: int) -> _Row:
    """A row's running state; one that cannot start (say, a seed its generator refuses) is
    failed at once and takes no further part."""
    try:
        return _Row(req, tokenizer, num_experts)
    except Exception as e:
        row = _Row(replace(req, seed=0), tokenizer, num_experts)
        row.fail(e)
        return row


@torch.no_grad()
def generate_batch(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: list[RowRequest]
) -> list[RowResult]:
    """Generate every request in one batch (KV cache, left padding, per-row expert masks)."""
    if not requests:
        return []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(requests), width), pad, dtype=torch.long)
    attention = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        attention[i, width - len(r.prompt_ids) :] = 1
    num_experts = int(requests[0].mask.numel())
    rows = [_new_row(r, tokenizer, num_experts) for r in requests]
    ids, attention = ids.to(device), attention.to(device)
    set_expert_mask(model, torch.stack([r.mask for r in requests]).to(device))
    past = None
    step_input = ids
    try:
        with record_routing(model) as record:
            for _ in range(max(r.max_tokens for r in requests)):
                positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, -step_input.shape[1] :]
                out = model(
                    input_ids=step_input, attention_mask=attention, position_ids=positions,
                    past_key_values=past, use_cache=True,
                )  # fmt: skip
                past = out.past_key_values
                routing = record.calls[-1][:, -1, :].double()  # (B, N) at the producing position
                logits = out.logits[:, -1, :]
                chosen = []
                for i, row in enumerate(rows):
                    if row.done is None and row.req.cancelled and row.req.cancelled():
                        row.cancel()
                    if row.done is not None:
                        chosen.append(pad)
                        continue
                    try:
                        token = _sample(logits[i], row, eos)
                        row.add(token, eos, routing[i])
                    except Exception as e:  # this row's own fault: it alone fails
                        row.fail(e)
                        token = pad
                    chosen.append(token)
                if all(row.done is not None for row in rows):
                    break
                step_input = torch.tensor(chosen, device=device)[:, None]
                live = torch.tensor([row.done is None for row in rows], device=device)
                attention = torch.cat([attention, live.long()[:, None]], dim=1)
                record.calls.clear()  # only the newest call is read; keep memory flat
    finally:
        set_expert_mask(model, None)
    # each row is done by its own max_tokens at the latest, and the loop runs the longest one
    return [row.final for row in rows if row.final is not None]
