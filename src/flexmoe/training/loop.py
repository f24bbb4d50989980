"""The training loop: one process or many under torchrun (gloo on CPU, NCCL on CUDA).

Many processes either copy the model (DDP, the default) or shard it (``fsdp``: FSDP2's
``fully_shard`` per decoder layer, so that weights, gradients and optimiser state are split over
the processes). Either way each process sees its share of every batch, and the loss curve is the
one process's (tested with two processes on the CPU).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from flexmoe.data.packing import TokenStream
from flexmoe.device import autocast
from flexmoe.errors import FlexMoEError, TrainingInterrupted
from flexmoe.io import show_progress
from flexmoe.training.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from flexmoe.training.config import TrainConfig
from flexmoe.training.metrics import MetricsLog
from flexmoe.training.schedule import batch_indices, lr_at

AuxLoss = Callable[[nn.Module], torch.Tensor]


@dataclass
class TrainResult:
    """What a run did; every number is measured during the run."""

    steps: int
    tokens: int
    final_train_loss: float
    final_val_loss: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when launched by torchrun; else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())


def barrier(info: DistInfo) -> None:
    """Wait for every process (a no-op in a single process)."""
    if info.world_size > 1:
        dist.barrier()


def next_token_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``batch[:, 1:]`` from ``batch[:, :-1]``."""
    logits = model(input_ids=batch[:, :-1]).logits  # (B, L, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def validation_loss(
    model: nn.Module, stream: TokenStream, cfg: TrainConfig, device: torch.device
) -> float:
    """Mean loss over up to ``eval_batches`` evenly spaced batches of validation blocks."""
    blocks = stream.num_blocks(cfg.seq_len)
    if blocks == 0:
        raise FlexMoEError("validation data", f"shorter than one block of {cfg.seq_len} tokens")
    count = min(blocks, cfg.eval_batches * cfg.batch_size)
    picks = sorted({int(i * blocks / count) for i in range(count)})
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for start in range(0, len(picks), cfg.batch_size):
        batch = stream.batch(picks[start : start + cfg.batch_size], cfg.seq_len).to(device)
        with autocast(device):
            total += next_token_loss(model, batch).item() * len(batch)
        n += len(batch)
    model.train(was_training)
    return total / n


@contextmanager
def _stop_on_signals() -> Iterator[list[bool]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps."""
    flag = [False]

    def handler(signum: int, frame: Any) -> None:
        flag[0] = True

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with suppress(ValueError):  # not the main thread: signals stay as they are
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _any(flag: bool, info: DistInfo, device: torch.device) -> bool:
    if info.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _mean(value: float, info: DistInfo, device: torch.device) -> float:
    if info.world_size == 1:
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Keep only each decoder layer's input in forward and recompute the rest in backward
    (transformers' layer checkpointing, non-reentrant, so frozen inputs are fine)."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise FlexMoEError("--activation-checkpointing", "this model does not support it")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shard_model(model: nn.Module, device: torch.device) -> list[nn.Parameter]:
    """FSDP2 in place: each decoder layer its own unit, then the rest. On CUDA the weights are
    gathered in bf16 (frozen bf16 and trained float32 tensors alike) and gradients reduced in
    float32; on the CPU everything stays float32.

    FSDP2 cannot shard scalars (the owners' router biases): they stay whole on every process,
    and the trained ones are returned, for :func:`average_gradients` to reduce.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise FlexMoEError("--fsdp", "the model has no decoder layers to shard")
    scalars = {p for p in model.parameters() if p.dim() == 0}
    for layer in layers:
        fully_shard(layer, mp_policy=policy, ignored_params=scalars)
    fully_shard(model, mp_policy=policy, ignored_params=scalars)
    return [p for p in scalars if p.requires_grad]


def average_gradients(params: list[nn.Parameter], info: DistInfo) -> None:
    """Average the gradients of parameters no wrapper reduces, over every process."""
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= info.world_size


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state on the CPU: gathered from every process when sharded (every
    process must call it then), else its own state dict."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return dict(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        out[name] = full.detach().cpu()
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on vectors (norms, router rows, biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


class TrainingMode:
    """How a run draws its batches and updates: the plain mode takes each step's blocks from the
    seeded schedule, split over the processes (DDP or FSDP), with gradient accumulation, clipping
    and checkpoints. Another mode (DP-SGD: :class:`flexmoe.expert.private.PrivateMode`) plugs in
    its own sampler, optimizer wrapper and accountant through these hooks."""

    checkpoints = True  # may the run be checkpointed and resumed
    clips = True  # whether the loop clips the gradient norm (a DP optimizer clips per sample)

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        """Adapt ``model`` before its trainable parameters are collected."""

    def wrap(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        info: DistInfo,
        cfg: TrainConfig,
        num_blocks: int,
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The module the loss runs through, and the optimizer that steps."""
        if info.world_size > 1 and not cfg.fsdp:
            return nn.parallel.DistributedDataParallel(model), optimizer
        return model, optimizer

    def indices(self, step: int, cfg: TrainConfig, num_blocks: int, info: DistInfo) -> list[int]:
        """This process's blocks for ``step`` (0-based)."""
        return batch_indices(step, cfg, num_blocks)[info.rank :: info.world_size]

    def empty_step(self, params: list[nn.Parameter]) -> None:
        """Prepare an update from no blocks (only a sampling mode can draw none)."""
        raise FlexMoEError("training data", "a step drew no blocks")

    @contextmanager
    def running(self) -> Iterator[None]:
        """Around the whole run: undoes :meth:`prepare` and :meth:`wrap` when it ends."""
        yield


def train(
    model: nn.Module,
    *,
    train_stream: TokenStream,
    val_stream: TokenStream | None,
    cfg: TrainConfig,
    device: torch.device,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    aux_loss: AuxLoss | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    progress: bool = True,
    desc: str = "train",
    log_dir: Path | None = None,
    mode: TrainingMode | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps.

    Only parameters with ``requires_grad`` are updated and checkpointed; ``aux_loss`` adds to the
    loss of each micro-batch, ``after_step`` runs after each optimizer step (e.g. a projection).
    A checkpoint is written every ``cfg.checkpoint_every`` steps and on SIGINT/SIGTERM (then
    :class:`TrainingInterrupted` is raised); with ``resume`` the run continues from it exactly:
    same batches, same schedule. With ``log_dir``, the history goes to TensorBoard event files
    in ``log_dir/<desc>`` as it is made. ``mode`` changes how batches are drawn and the model
    updated (default: :class:`TrainingMode`).
    """
    mode = mode or TrainingMode()
    run = _Run.start(model, train_stream, cfg, device, mode, optimizer)
    if not mode.checkpoints:
        checkpoint_dir, resume = None, False
    if resume and checkpoint_dir is not None and (checkpoint_dir / "trainer_state.json").is_file():
        run.state = load_checkpoint(checkpoint_dir, params=run.params, optimizer=run.optimizer)
        _check_resumable(checkpoint_dir, run.state, cfg, len(train_stream.tokens))
    bar = tqdm(
        total=cfg.steps,
        initial=run.state.step,
        desc=desc,
        unit="step",
        disable=not (show_progress(progress) and run.info.is_main),
        dynamic_ncols=True,
    )
    metrics = MetricsLog(log_dir if run.info.is_main else None, _run_name(desc))
    start_time, start_tokens = time.perf_counter(), run.state.tokens
    with closing(metrics):
        with mode.running(), _stop_on_signals() as stop, bar:
            while run.state.step < cfg.steps:
                record = run.step(aux_loss, after_step)
                step = run.state.step
                if record and val_stream and cfg.eval_every and step % cfg.eval_every == 0:
                    run.val_loss = validation_loss(model, val_stream, cfg, device)
                    record["val_loss"] = run.val_loss
                elapsed = max(time.perf_counter() - start_time, 1e-9)
                rate = (run.state.tokens - start_tokens) / elapsed
                if record:
                    run.state.history.append(record)
                    metrics.record(record, rate)
                bar.update(1)
                bar.set_postfix(loss=f"{run.train_loss:.3f}", tok_s=f"{rate:,.0f}")
                if checkpoint_dir and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    run.checkpoint(checkpoint_dir)
                if _any(stop[0], run.info, device) and step < cfg.steps:
                    run.checkpoint(checkpoint_dir)
                    again = "; rerun with --resume" if checkpoint_dir else ""
                    raise TrainingInterrupted(checkpoint_dir, f"interrupted at step {step}{again}")
        last = run.state.history[-1] if run.state.history else {}
        if val_stream is not None and (run.val_loss is None or "val_loss" not in last):
            run.val_loss = validation_loss(model, val_stream, cfg, device)
            metrics.record({"step": run.state.step, "val_loss": run.val_loss})
    return run.result(time.perf_counter() - start_time)


def _run_name(desc: str) -> str:
    """A run's name in TensorBoard: ``train (DP)`` -> ``train-DP``."""
    return desc.replace(" ", "-").replace("(", "").replace(")", "")


@dataclass
class _Run:
    """The state of one training run between steps."""

    model: nn.Module
    wrapped: nn.Module
    stream: TokenStream
    cfg: TrainConfig
    device: torch.device
    mode: TrainingMode
    info: DistInfo
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    unsharded: list[nn.Parameter]
    state: TrainerState
    num_blocks: int
    train_loss: float = math.nan
    val_loss: float | None = None

    @classmethod
    def start(
        cls,
        model: nn.Module,
        stream: TokenStream,
        cfg: TrainConfig,
        device: torch.device,
        mode: TrainingMode,
        optimizer: torch.optim.Optimizer | None,
    ) -> _Run:
        """Join the processes, place and wrap the model, build the optimizer."""
        info = init_distributed(device)
        cfg.check_world(info.world_size)
        num_blocks = stream.num_blocks(cfg.seq_len)
        if num_blocks == 0:
            raise FlexMoEError("training data", f"shorter than one block of {cfg.seq_len} tokens")
        model.to(device).train()
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        unsharded: list[nn.Parameter] = []
        if cfg.fsdp and info.world_size > 1:
            unsharded = shard_model(model, device)
        mode.prepare(model, device)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise FlexMoEError(None, "the model has no trainable parameters")
        wrapped, optimizer = mode.wrap(
            model, optimizer or build_optimizer(model, cfg), info, cfg, num_blocks
        )
        state = TrainerState(
            step=0, tokens=0, config=cfg.to_dict(), data_tokens=len(stream.tokens), history=[]
        )
        return cls(
            model,
            wrapped,
            stream,
            cfg,
            device,
            mode,
            info,
            params,
            optimizer,
            unsharded,
            state,
            num_blocks,
        )

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    def step(
        self, aux_loss: AuxLoss | None, after_step: Callable[[nn.Module], None] | None
    ) -> dict[str, float]:
        """One optimizer step; its history record (empty when it drew no blocks)."""
        cfg, step = self.cfg, self.state.step
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        indices = self.mode.indices(step, cfg, self.num_blocks, self.info)
        if indices:
            loss = self._forward_backward(indices, aux_loss)
        else:
            self.mode.empty_step(list(self.params.values()))
        average_gradients(self.unsharded, self.info)
        if self.mode.clips and cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(self.model)
        self.state.step += 1
        self.state.tokens += len(indices) * self.info.world_size * cfg.seq_len
        if not indices:
            return {}
        self.train_loss = _mean(loss, self.info, self.device)
        return {"step": self.state.step, "loss": self.train_loss, "lr": lr_at(step, cfg)}

    def _forward_backward(self, indices: list[int], aux_loss: AuxLoss | None) -> float:
        """Forward and backward of this process's blocks in ``grad_accum`` micro-batches; the
        mean loss."""
        accum, total = self.cfg.grad_accum, 0.0
        micro = math.ceil(len(indices) / accum)
        for a in range(accum):
            batch = self.stream.batch(indices[a * micro : (a + 1) * micro], self.cfg.seq_len)
            sync = a == accum - 1 or self.info.world_size == 1
            no_sync = getattr(self.wrapped, "no_sync", nullcontext)
            with nullcontext() if sync else no_sync(), autocast(self.device):
                loss = next_token_loss(self.wrapped, batch.to(self.device))
                total += loss.item() / accum
                if aux_loss is not None:
                    loss = loss + aux_loss(self.model)
                (loss / accum).backward()
        return total

    def checkpoint(self, directory: Path | None) -> None:
        if directory is not None:  # every process joins in gathering sharded tensors
            save_checkpoint(
                directory,
                params=self.params,
                optimizer=self.optimizer,
                state=self.state,
                write=self.info.is_main,
            )
        barrier(self.info)

    def result(self, seconds: float) -> TrainResult:
        loss = self.train_loss if not math.isnan(self.train_loss) else _last_loss(self.state)
        return TrainResult(
            steps=self.state.step,
            tokens=self.state.tokens,
            final_train_loss=loss,
            final_val_loss=self.val_loss,
            history=self.state.history,
            seconds=seconds,
        )


def _last_loss(state: TrainerState) -> float:
    return state.history[-1]["loss"] if state.history else math.nan


def _check_resumable(where: Path, state: TrainerState, cfg: TrainConfig, data_tokens: int) -> None:
    saved = TrainConfig.from_dict(state.config).result_fields()
    for name, value in cfg.result_fields().items():
        if saved[name] != value:
            raise FlexMoEError(where, f"checkpoint was made with {name}={saved[name]}, now {value}")
    if state.data_tokens != data_tokens:
        raise FlexMoEError(where, "checkpoint was made on different training data")
