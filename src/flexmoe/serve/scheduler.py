"""One worker thread owns the model and batches continuously: between two decode steps, queued
requests join the running batch and finished ones leave it, each row with its own expert
selection, so a request that arrives while others generate starts at the next step.

When requests join, the worker reads the owners' standing choice from the model's store, so an
opt-out that has been answered applies to every request admitted afterwards. Each finished row
is appended to the usage ledger before its answer is released; a cancelled one is not.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flexmoe.device import autocast
from flexmoe.errors import FlexMoEError
from flexmoe.inference.selection import Selection
from flexmoe.merge.slots import SlotInfo
from flexmoe.merge.standing import standing_exclusions
from flexmoe.serve.batch import RowRequest, RowResult, RunningBatch
from flexmoe.serve.ledger import Ledger


@dataclass
class Job:
    """One request on its way through the worker. Events go to ``events`` on the server's
    event loop: ``("text", str)`` while streaming, then ``("done", RowResult)`` or
    ``("error", str)``."""

    request_id: str
    endpoint: str
    prompt_ids: list[int]
    selection: Selection
    max_tokens: int
    min_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    loop: asyncio.AbstractEventLoop
    logprobs: int | None = None  # each token's log-probability and this many alternatives
    echo_from: int | None = None  # score the prompt's tokens from this index on (echo)
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client left

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Scheduler:
    """The batching worker. ``submit`` is safe from any thread; ``close`` stops the worker."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        model_dir: Path,
        slots: list[SlotInfo],
        *,
        device: torch.device,
        max_batch: int = 8,
        window_s: float = 0.005,
    ) -> None:
        self.model, self.tokenizer, self.model_dir, self.slots = model, tokenizer, model_dir, slots
        self.max_batch, self.window_s = max_batch, window_s
        self.device = device
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.batches: list[int] = []  # size of each batch run, for tests and the benchmark
        self.cancelled: list[int] = []  # tokens each cancelled row had made when it stopped
        self.thread = threading.Thread(target=self._run, name="flexmoe-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    def _admit(self, running: int) -> list[Job] | None:
        """New jobs to join a batch of ``running`` rows, up to ``max_batch`` in all: wait for
        one (and whatever else comes within the window) when nothing runs, else take only what
        is already queued. None once :meth:`close` was called."""
        jobs: list[Job] = []
        if running == 0:
            first = self.queue.get()
            if first is None:
                return None
            jobs.append(first)
        deadline = time.monotonic() + (self.window_s if running == 0 else 0.0)
        while running + len(jobs) < self.max_batch:
            try:
                job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return None
            jobs.append(job)
        return jobs

    def _run(self) -> None:
        """Continuous batching: between decode steps, queued jobs join and finished ones
        leave, so a request that arrives while others generate starts at the next step."""
        ledger = Ledger(self.model_dir)
        running = RunningBatch(self.model, self.tokenizer)
        try:
            while (jobs := self._admit(len(running))) is not None:
                if jobs:
                    self._join(running, jobs, ledger)
                if len(running):
                    self._step(running)
        finally:
            ledger.close()

    def _join(self, running: RunningBatch, jobs: list[Job], ledger: Ledger) -> None:
        try:
            opted_out = standing_exclusions(self.model_dir, self.slots)  # read at each admission
        except FlexMoEError as e:
            for job in jobs:
                job.emit("error", str(e))
            return
        rows = []
        for job in jobs:
            try:
                mask = replace(job.selection, opted_out=opted_out).mask(self.slots)
            except FlexMoEError as e:
                job.emit("error", str(e))
                continue
            rows.append(self._row(job, mask, ledger))
        if not rows:
            return
        try:
            with autocast(self.device):
                running.add(rows)
        except Exception as e:  # the prefill failed: these rows fail, the running ones go on
            for job in jobs:
                job.emit("error", f"generation failed: {e}")
        self.batches.append(len(running))

    def _step(self, running: RunningBatch) -> None:
        try:
            with autocast(self.device):
                running.step()
        except Exception as e:  # the server must keep serving; the clients hear what failed
            for row in running.rows:
                row.fail(e)
            running.clear()

    def _row(self, job: Job, mask: torch.Tensor, ledger: Ledger) -> RowRequest:
        names = [s.name for s in self.slots]

        def finish(result: RowResult) -> None:
            if result.finish_reason == "cancelled":  # never delivered: not in the ledger
                self.cancelled.append(len(result.token_ids))
                return
            shares = dict(zip(names, result.shares, strict=True))
            ledger.record(
                job.request_id,
                endpoint=job.endpoint,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=len(result.token_ids),
                shares=shares,
            )
            job.emit("done", result)

        return RowRequest(
            prompt_ids=job.prompt_ids,
            mask=mask,
            max_tokens=job.max_tokens,
            min_tokens=job.min_tokens,
            temperature=job.temperature,
            top_p=job.top_p,
            seed=job.seed,
            stop=job.stop,
            on_text=(lambda text: job.emit("text", text)) if job.stream else None,
            on_finish=finish,
            on_error=lambda message: job.emit("error", message),
            cancelled=job.cancelled.is_set,
            logprobs=job.logprobs,
            echo_from=job.echo_from,
        )
