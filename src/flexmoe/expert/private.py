"""Differentially private expert training: DP-SGD through Opacus.

Only the owner's trained tensors (expert 1's projections, its router row r_1 and bias b_1) have
gradients, so only theirs are taken per sample. Each sample's gradient is clipped to
``max_grad_norm`` (over all those tensors together), Gaussian noise of ``noise_multiplier x
max_grad_norm`` is added to the sum, and batches are Poisson-sampled (each block joins a step with
probability ``sample_rate``), as the accountant's analysis assumes. The noise is chosen up front
so that the run's ``steps`` spend at most the target epsilon at ``delta``; the accountant's
(RDP) epsilon for the steps actually taken is what the manifest records.

The privacy unit is one training block: ``seq_len + 1`` consecutive tokens of the packed
training stream. A document spanning k blocks is protected as a group of k (its epsilon is up to
k times larger); documents shorter than a block share one.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from flexmoe.data.packing import TokenStream
from flexmoe.device import autocast
from flexmoe.errors import FlexMoEError
from flexmoe.io import show_progress
from flexmoe.model.checkpoint import moe_layers
from flexmoe.model.moe import Router
from flexmoe.training.config import TrainConfig
from flexmoe.training.loop import (
    AuxLoss,
    TrainResult,
    build_optimizer,
    next_token_loss,
    validation_loss,
)
from flexmoe.training.metrics import MetricsLog
from flexmoe.training.schedule import lr_at

ACCOUNTANT = "rdp"


@dataclass(frozen=True)
class PrivacySettings:
    """What an owner asks for: ``(epsilon, delta)``-DP for each training block, with per-sample
    gradients clipped to ``max_grad_norm``."""

    epsilon: float
    delta: float
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and 0 < self.epsilon <= 1000):
            raise FlexMoEError("--dp-epsilon", f"must be in (0, 1000], got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise FlexMoEError("--dp-delta", f"must be in (0, 1), got {self.delta}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise FlexMoEError("--max-grad-norm", f"must be positive, got {self.max_grad_norm}")


class PrivacyRecord(BaseModel):
    """What the manifest says of a DP-trained expert: the accountant's epsilon and how."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mechanism: Literal["dp-sgd"] = "dp-sgd"
    accountant: Literal["rdp"] = "rdp"
    epsilon: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]  # spent
    target_epsilon: Annotated[float, Field(gt=0, le=1000)]
    delta: Annotated[float, Field(gt=0, lt=1)]
    max_grad_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    noise_multiplier: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]
    sample_rate: Annotated[float, Field(gt=0, le=1)]
    steps: Annotated[int, Field(ge=0, le=10**12)]
    unit_tokens: Annotated[int, Field(ge=2, le=1 << 24)]  # the privacy unit: one block


def accountant_epsilon(record: PrivacyRecord) -> float:
    """Epsilon at ``record.delta`` for its noise, sample rate and steps, from a fresh RDP
    accountant (what ``verify`` and the tests compare the manifest with)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(record.noise_multiplier, record.sample_rate, record.steps)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="opacus")  # alpha-range advice
        return float(accountant.get_epsilon(delta=record.delta))


def check_record(where: Path, record: PrivacyRecord) -> None:
    """A manifest's epsilon is the accountant's for its own terms: a package cannot claim more
    privacy than its noise, sample rate and steps give."""
    recomputed = accountant_epsilon(record)
    if not math.isclose(recomputed, record.epsilon, rel_tol=1e-6, abs_tol=1e-9):
        raise FlexMoEError(
            where, f"field 'training.privacy.epsilon': {record.epsilon:.6g} is not what its "
            f"noise, sample rate and steps give ({recomputed:.6g})",
        )  # fmt: skip


class PrivateRouter(Router):
    """The 2-expert training router with r_0 (frozen), r_1 and b_1 as its own parameters:
    Opacus takes per-sample gradients module by module, from each module's own parameters."""

    def __init__(self, router: Router) -> None:
        nn.Module.__init__(self)
        if router.num_experts != 2:
            raise ValueError("DP training routes between the public expert and one owner's")
        # r_0 frozen as a parameter, not a buffer: Opacus refuses buffers in a trained module
        self.public = nn.Parameter(router.rows[0].detach().clone(), requires_grad=False)
        self.row = nn.Parameter(router.rows[1].detach().float().clone())
        self.bias = nn.Parameter(router.biases[0].detach().float().clone())
        self.used_bias = False

    @property
    def rows(self) -> list[torch.Tensor]:  # type: ignore[override]
        return [self.public, self.row]

    @property
    def biases(self) -> list[torch.Tensor]:  # type: ignore[override]
        return [self.bias]

    def forward(self, x: torch.Tensor, *, use_bias: bool) -> torch.Tensor:
        self.used_bias = use_bias
        return super().forward(x, use_bias=use_bias)

    def restore(self, router: Router) -> None:
        """Write the trained r_1 and b_1 back into the model's own router."""
        with torch.no_grad():
            router.rows[1].copy_(self.row)
            router.biases[0].copy_(self.bias)


def _router_grad_sample(
    layer: PrivateRouter, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of r_1 and b_1 from the router's input ``(B, T, H)`` and the gradient
    of its logits ``(B, T, 2)``. b_1 enters as ``min(b_1, 0)``, kept <= 0 by a projection, so its
    gradient is the logit gradient's sum."""
    x, g = activations[0].float(), backprops.float()[..., 1]  # (B, T, H), (B, T)
    bias = g.sum(dim=1) if layer.used_bias else torch.zeros_like(g[:, 0])
    return {layer.row: torch.einsum("bt,bth->bh", g, x), layer.bias: bias}


def _register() -> None:
    from opacus.grad_sample import register_grad_sampler

    register_grad_sampler(PrivateRouter)(_router_grad_sample)


def train_private(
    model: nn.Module, *, train_stream: TokenStream, val_stream: TokenStream | None,
    cfg: TrainConfig, privacy: PrivacySettings, device: torch.device,
    aux_loss: AuxLoss | None = None, after_step: Callable[[nn.Module], None] | None = None,
    progress: bool = True, desc: str = "train (DP)", log_dir: Path | None = None,
) -> tuple[TrainResult, PrivacyRecord]:  # fmt: skip
    """Train ``model``'s trainable tensors for ``cfg.steps`` DP-SGD steps (one process; no
    checkpoints: a resumed run would have to account for the steps before it)."""
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.data_loader import DPDataLoader

    _register()
    num_blocks = train_stream.num_blocks(cfg.seq_len)
    if num_blocks < 2 * cfg.batch_size:
        raise FlexMoEError(
            "--batch-size", f"DP-SGD samples batches of {cfg.batch_size} from {num_blocks} "
            "blocks; give more data or a smaller batch",
        )  # fmt: skip
    if cfg.grad_accum != 1:
        raise FlexMoEError("--grad-accum", "DP-SGD takes one batch per step (use 1)")
    model.to(device).train()
    routers = []
    for moe in moe_layers(model):
        private = PrivateRouter(moe.router).to(device)
        routers.append((moe, moe.router, private))
        moe.router = private
    # Which blocks join a step, and the noise, must stay unknown to anyone who reads the
    # package: both come from the operating system's randomness, never from --seed.
    sampling = torch.Generator().manual_seed(secrets.randbits(63))
    noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    loader = DPDataLoader.from_data_loader(
        DataLoader(TensorDataset(torch.arange(num_blocks)), batch_size=cfg.batch_size),
        generator=sampling,
    )  # Poisson sampling: each block joins each step with probability sample_rate
    sample_rate = 1 / len(loader)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="opacus")  # RNG and alpha-range advice
        sigma = get_noise_multiplier(
            target_epsilon=privacy.epsilon, target_delta=privacy.delta,
            sample_rate=sample_rate, steps=cfg.steps, accountant=ACCOUNTANT,
        )  # fmt: skip
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        wrapped, optimizer, loader = engine.make_private(
            module=model, optimizer=build_optimizer(model, cfg), data_loader=loader,
            noise_multiplier=sigma, max_grad_norm=privacy.max_grad_norm, noise_generator=noise,
            poisson_sampling=False,  # the loader samples already, from its own generator
        )  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(
        total=cfg.steps,
        desc=desc,
        unit="step",
        disable=not show_progress(progress),
        dynamic_ncols=True,
    )
    history: list[dict[str, float]] = []
    metrics = MetricsLog(log_dir, desc.replace(" ", "-").replace("(", "").replace(")", ""))
    step = tokens = 0

    def batches() -> Iterator[list[int]]:
        while True:  # epoch after epoch of the Poisson-sampled loader
            for (indices,) in loader:
                yield indices.tolist()

    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for step, indices in zip(range(1, cfg.steps + 1), batches(), strict=False):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step - 1, cfg)
                value = _private_step(
                    wrapped, model, params, train_stream, indices, cfg, device, aux_loss
                )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if after_step is not None:
                    after_step(model)
                tokens += len(indices) * cfg.seq_len
                if not math.isnan(value):
                    history.append({"step": step, "loss": value, "lr": lr_at(step - 1, cfg)})
                    metrics.record(history[-1], tokens / (time.perf_counter() - start))
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}")
    finally:
        bar.close()
        metrics.close()
        wrapped._close()  # the hooks go; the model is plain again
        for moe, router, private in routers:
            private.restore(router)
            moe.router = router
    seconds = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="opacus")
        spent = float(engine.get_epsilon(privacy.delta))
    record = PrivacyRecord(
        epsilon=spent, target_epsilon=privacy.epsilon,
        delta=privacy.delta, max_grad_norm=privacy.max_grad_norm, noise_multiplier=sigma,
        sample_rate=sample_rate, steps=step, unit_tokens=cfg.seq_len + 1,
    )  # fmt: skip
    val_loss = validation_loss(model, val_stream, cfg, device) if val_stream else None
    final = history[-1]["loss"] if history else math.nan
    result = TrainResult(
        steps=step, tokens=tokens, final_train_loss=final, final_val_loss=val_loss,
        history=history, seconds=seconds,
    )  # fmt: skip
    return result, record


def _private_step(
    wrapped: nn.Module, model: nn.Module, params: list[nn.Parameter], stream: TokenStream,
    indices: list[int], cfg: TrainConfig, device: torch.device, aux_loss: AuxLoss | None,
) -> float:  # fmt: skip
    """Forward and backward of one Poisson-sampled batch (its per-sample gradients land on the
    parameters); an empty batch gets empty per-sample gradients, so the step is noise alone."""
    if not indices:
        for p in params:
            empty = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            setattr(p, "grad_sample", empty)  # noqa: B010 (Opacus reads this attribute)
        return math.nan
    batch = stream.batch(indices, cfg.seq_len).to(device)
    with autocast(device):
        loss = next_token_loss(wrapped, batch)
        value = loss.item()
        if aux_loss is not None:
            loss = loss + aux_loss(model)
        loss.backward()
    return value
