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

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from flexmoe.inference.attribution import record_routing
from flexmoe.inference.selection import set_expert_mask


def cache_keyword(model: torch.nn.Module) -> str:
    """The name the model's forward takes its KV cache under: ``cache`` in the transformers
    releases that renamed it (``past_key_values`` goes in 5.40), else ``past_key_values``."""
    return _cache_keyword(type(model))  # type: ignore[arg-type]  # a class is hashable


@functools.cache  # once per model class
def _cache_keyword(kind: type[torch.nn.Module]) -> str:
    parameters = inspect.signature(kind.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


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
    logprobs: int | None = None  # each token's log-probability and this many alternatives
    echo_from: int | None = None  # also score the prompt's tokens from this index on


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the served model (the request's experts), and the
    likeliest alternatives at its position (``top``: token and log-probability)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RowResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end of text or a stop string), "length" or "cancelled"
    expert_mass: list[float]  # per slot: routing mass summed over the generated tokens
    shares: list[float] = field(default_factory=list)  # per slot: share of that mass
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the generated tokens'
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # echo; first None


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
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] = []
        seed = req.seed if req.seed is not None else int(torch.seed() % (2**63))
        self.generator = torch.Generator().manual_seed(seed)

    def add(
        self,
        token: int,
        eos: int | None,
        routing: torch.Tensor,
        scored: TokenLogprob | None = None,
    ) -> None:
        """Take the sampled ``token``; ``routing`` (N,) is the mass at the position that made it,
        ``scored`` its log-probability (where the request asked for them)."""
        if token == eos:
            self.done = "stop"
        else:
            self.tokens.append(token)
            if scored is not None:
                self.logprobs.append(scored)
            self.mass += routing
            self.text = str(self.tokenizer.decode(self.tokens, skip_special_tokens=True))
            cut = min(
                (i for i in (self.text.find(s) for s in self.req.stop if s) if i >= 0), default=-1
            )
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

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop this row where it is (its client left: ``cancelled``; ``max_tokens`` 0:
        ``length``); ``on_finish`` hears the reason."""
        self.done = reason
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
            text=self.text,
            token_ids=self.tokens,
            prompt_tokens=len(self.req.prompt_ids),
            finish_reason=self.done or "length",
            expert_mass=[float(m) for m in self.mass],
            shares=shares,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )


def scored(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s entry from one position's log-probabilities (V,), with ``top`` alternatives."""
    if top <= 0:
        return TokenLogprob(token, float(logprobs[token]))
    best = logprobs.topk(top)
    pairs = tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), pairs)


def prompt_scores(
    logits: torch.Tensor, prompt: list[int], start: int, top: int
) -> list[TokenLogprob | None]:
    """The prompt's tokens from ``start`` on, scored from their row's logits (T, V) whose last
    ``len(prompt)`` positions are the prompt's: the first has no context here (None)."""
    offset = logits.shape[0] - len(prompt)
    rows = torch.log_softmax(logits[offset + start : offset + len(prompt) - 1].float(), dim=-1)
    found: list[TokenLogprob | None] = [None]
    found += [scored(rows[j], prompt[start + 1 + j], top) for j in range(rows.shape[0])]
    return found


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


def _new_row(req: RowRequest, tokenizer: PreTrainedTokenizerBase, num_experts: int) -> _Row | None:
    """A row's running state; a row that cannot start (say, a seed its generator refuses) fails
    at once through ``on_error`` and takes no part."""
    try:
        return _Row(req, tokenizer, num_experts)
    except Exception as e:
        if req.on_error is not None:
            req.on_error(f"generation failed: {e}")
        return None


class RunningBatch:
    """Iteration-level (continuous) batching: rows join and leave between decode steps.

    The batch holds one KV cache, left-padded, with an attention mask over its columns and each
    row's expert mask. :meth:`add` prefills new rows together and merges their cache into the
    running one (the shorter side is padded on the left; rotary positions come from the mask,
    so padding moves nothing); :meth:`step` decodes one token for every row; rows that finish,
    fail or are cancelled leave at once, and columns no row uses any more are dropped. Greedy
    rows give exactly what they give alone (tested).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos = tokenizer.eos_token_id
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.masks = torch.zeros(0, 0, dtype=torch.bool)  # (B, N) on the device
        self.attention = torch.zeros(0, 0, dtype=torch.long)  # (B, T) on the device
        self.next_ids = torch.zeros(0, 1, dtype=torch.long)  # (B, 1): each row's last token

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        """Drop every row and the cache."""
        self.rows, self.cache = [], None
        self.masks = torch.zeros(0, 0, dtype=torch.bool)
        self.attention = torch.zeros(0, 0, dtype=torch.long)
        self.next_ids = torch.zeros(0, 1, dtype=torch.long)

    @torch.no_grad()
    def add(self, requests: list[RowRequest]) -> None:
        """Prefill ``requests`` together, sample each one's first token, join the batch."""
        num_experts = int(requests[0].mask.numel())
        started = (_new_row(r, self.tokenizer, num_experts) for r in requests)
        rows = [row for row in started if row is not None]
        if not rows:
            return
        width = max(len(r.req.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            prompt = row.req.prompt_ids
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention[i, width - len(prompt) :] = 1
        ids, attention = ids.to(self.device), attention.to(self.device)
        masks = torch.stack([r.req.mask for r in rows]).to(self.device)
        cache = DynamicCache()
        logits, routing = self._forward(ids, attention, masks, cache)
        for i, row in enumerate(rows):
            if row.req.echo_from is not None:
                top = row.req.logprobs or 0
                row.prompt_logprobs = prompt_scores(
                    logits[i], row.req.prompt_ids, row.req.echo_from, top
                )
        chosen = self._next(rows, logits[:, -1, :], routing)
        self._join(rows, masks, cache, attention, chosen)
        self._leave()

    @torch.no_grad()
    def step(self) -> None:
        """One decode step for every row in the batch."""
        if not self.rows:
            return
        live = torch.ones(len(self.rows), 1, dtype=torch.long, device=self.device)
        self.attention = torch.cat([self.attention, live], dim=1)
        logits, routing = self._forward(self.next_ids, self.attention, self.masks, self.cache)
        self.next_ids = self._next(self.rows, logits[:, -1, :], routing)
        self._leave()

    def _forward(
        self, ids: torch.Tensor, attention: torch.Tensor, masks: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        set_expert_mask(self.model, masks)
        try:
            with record_routing(self.model) as record:
                out = self.model(
                    input_ids=ids,
                    attention_mask=attention,
                    position_ids=positions,
                    use_cache=True,
                    **{cache_keyword(self.model): cache},
                )
        finally:
            set_expert_mask(self.model, None)
        return out.logits, record.calls[-1][:, -1, :].double()  # (B, T, V), (B, N)

    def _next(self, rows: list[_Row], logits: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """Each row's next token (a row whose own work fails, fails alone), as ``(B, 1)``."""
        chosen = []
        for i, row in enumerate(rows):
            token = self.pad
            if row.done is None and row.req.cancelled and row.req.cancelled():
                row.cancel()  # its client left: no more tokens
            if row.done is None and row.req.max_tokens == 0:
                row.cancel("length")  # the prompt scored (echo), nothing to generate
            if row.done is None:
                try:
                    token = _sample(logits[i], row, self.eos)
                    top = row.req.logprobs
                    entry = None
                    if top is not None:
                        entry = scored(torch.log_softmax(logits[i].float(), -1), token, top)
                    row.add(token, self.eos, routing[i], entry)
                except Exception as e:  # this row's own fault: it alone fails
                    row.fail(e)
                    token = self.pad
            chosen.append(token)
        return torch.tensor(chosen, device=self.device)[:, None]

    def _join(
        self,
        rows: list[_Row],
        masks: torch.Tensor,
        cache: Any,
        attention: torch.Tensor,
        next_ids: torch.Tensor,
    ) -> None:
        if not self.rows:
            self.rows, self.masks, self.cache = rows, masks, cache
            self.attention, self.next_ids = attention, next_ids
            return
        width = max(self.attention.shape[1], attention.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
        self.attention = torch.cat([_left_pad(self.attention, width), _left_pad(attention, width)])
        self.rows = self.rows + rows
        self.masks = torch.cat([self.masks, masks])
        self.next_ids = torch.cat([self.next_ids, next_ids])

    def _leave(self) -> None:
        """Drop finished rows, then the leading columns no remaining row attends to."""
        keep = [i for i, row in enumerate(self.rows) if row.done is None]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.masks, self.next_ids = self.masks[index], self.next_ids[index]
        self.attention = self.attention[index]
        first = int(self.attention.any(0).long().argmax())  # the first column still used
        self.attention = self.attention[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left of the sequence axis (dim 1 of a mask, dim 2 of keys/values)."""
    axis = 1 if tensor.dim() == 2 else 2
    missing = width - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


def generate_batch(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: list[RowRequest]
) -> list[RowResult]:
    """Generate every request together, to the end of the longest (KV cache, left padding,
    per-row expert masks); the results of the rows that finished, in request order."""
    if not requests:
        return []
    batch = RunningBatch(model, tokenizer)
    finals: dict[int, RowResult] = {}
    wrapped = []
    for i, req in enumerate(requests):
        done = req.on_finish

        def finish(result: RowResult, i: int = i, done: Any = done) -> None:
            finals[i] = result
            if done is not None:
                done(result)

        wrapped.append(replace(req, on_finish=finish))
    batch.add(wrapped)
    while len(batch):
        batch.step()
    return [finals[i] for i in sorted(finals)]
