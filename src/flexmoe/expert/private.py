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
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flexmoe.data.packing import TokenStream
from flexmoe.errors import FlexMoEError
from flexmoe.expert.manifest import PrivacyRecord
from flexmoe.model.checkpoint import moe_layers
from flexmoe.model.moe import Router
from flexmoe.training.config import TrainConfig
from flexmoe.training.loop import AuxLoss, DistInfo, TrainingMode, TrainResult, train

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
            raise FlexMoEError("--dp-record-epsilon", f"must be in (0, 1000], got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise FlexMoEError("--dp-record-delta", f"must be in (0, 1), got {self.delta}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise FlexMoEError("--dp-clip", f"must be positive, got {self.max_grad_norm}")


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


class PrivateMode(TrainingMode):
    """DP-SGD as a mode of the training loop: Poisson-sampled batches, Opacus' optimizer (per-sample
    clipping and noise) and its RDP accountant; one process, no checkpoints (a resumed run would
    have to account for the steps before it)."""

    checkpoints = False
    clips = False  # the optimizer clips each sample's gradient

    def __init__(self, privacy: PrivacySettings) -> None:
        self.privacy = privacy
        self.routers: list[tuple[nn.Module, Router, PrivateRouter]] = []
        self.record: PrivacyRecord | None = None
        self._steps = 0

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        """Each router becomes a :class:`PrivateRouter`, whose tensors Opacus can sample."""
        _register()
        for moe in moe_layers(model):
            private = PrivateRouter(moe.router).to(device)
            self.routers.append((moe, moe.router, private))
            moe.router = private

    def wrap(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        info: DistInfo,
        cfg: TrainConfig,
        num_blocks: int,
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        from opacus import PrivacyEngine
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.data_loader import DPDataLoader

        if info.world_size > 1:
            raise FlexMoEError(
                "--dp-record-epsilon", "DP-SGD runs in one process, not under torchrun"
            )
        if num_blocks < 2 * cfg.batch_size:
            raise FlexMoEError(
                "--batch-size",
                f"DP-SGD samples batches of {cfg.batch_size} from {num_blocks} "
                "blocks; give more data or a smaller batch",
            )
        if cfg.grad_accum != 1:
            raise FlexMoEError("--grad-accum", "DP-SGD takes one batch per step (use 1)")
        device = next(model.parameters()).device
        # Which blocks join a step, and the noise, must stay unknown to anyone who reads the
        # package: both come from the operating system's randomness, never from --seed.
        sampling = torch.Generator().manual_seed(secrets.randbits(63))
        noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        loader = DPDataLoader.from_data_loader(
            DataLoader(TensorDataset(torch.arange(num_blocks)), batch_size=cfg.batch_size),
            generator=sampling,
        )  # Poisson sampling: each block joins each step with probability sample_rate
        self.sample_rate, self.unit_tokens = 1 / len(loader), cfg.seq_len + 1
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="opacus")  # RNG and alpha-range advice
            self.sigma = get_noise_multiplier(
                target_epsilon=self.privacy.epsilon,
                target_delta=self.privacy.delta,
                sample_rate=self.sample_rate,
                steps=cfg.steps,
                accountant=ACCOUNTANT,
            )
            self.engine = PrivacyEngine(accountant=ACCOUNTANT)
            self.wrapped, optimizer, loader = self.engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=self.sigma,
                max_grad_norm=self.privacy.max_grad_norm,
                noise_generator=noise,
                poisson_sampling=False,  # the loader samples already, from its own generator
            )
        self._batches = _epochs(loader)
        return self.wrapped, optimizer

    def indices(self, step: int, cfg: TrainConfig, num_blocks: int, info: DistInfo) -> list[int]:
        self._steps = step + 1
        return next(self._batches)

    def empty_step(self, params: list[nn.Parameter]) -> None:
        """Empty per-sample gradients: the step is noise alone."""
        for p in params:
            empty = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            setattr(p, "grad_sample", empty)  # noqa: B010 (Opacus reads this attribute)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Opacus' hooks and the private routers for the run; afterwards the trained rows go
        back into the model's routers, the hooks go, and the accountant's epsilon is kept."""
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                yield
        finally:
            self.wrapped._close()  # the hooks go; the model is plain again
            for moe, router, private in self.routers:
                private.restore(router)
                moe.router = router
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="opacus")
            spent = float(self.engine.get_epsilon(self.privacy.delta))
        self.record = PrivacyRecord(
            epsilon=spent,
            target_epsilon=self.privacy.epsilon,
            delta=self.privacy.delta,
            max_grad_norm=self.privacy.max_grad_norm,
            noise_multiplier=self.sigma,
            sample_rate=self.sample_rate,
            steps=self._steps,
            unit_tokens=self.unit_tokens,
        )


def _epochs(loader: Iterable[tuple[torch.Tensor]]) -> Iterator[list[int]]:
    """Batches of block indices, epoch after epoch of the Poisson-sampled loader."""
    while True:
        for (indices,) in loader:
            yield indices.tolist()


def train_private(
    model: nn.Module,
    *,
    train_stream: TokenStream,
    val_stream: TokenStream | None,
    cfg: TrainConfig,
    privacy: PrivacySettings,
    device: torch.device,
    aux_loss: AuxLoss | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    progress: bool = True,
    desc: str = "train (DP)",
    log_dir: Path | None = None,
) -> tuple[TrainResult, PrivacyRecord]:
    """Train ``model``'s trainable tensors for ``cfg.steps`` DP-SGD steps: the training loop in
    :class:`PrivateMode`; the result and the accountant's record."""
    mode = PrivateMode(privacy)
    result = train(
        model,
        train_stream=train_stream,
        val_stream=val_stream,
        cfg=cfg,
        device=device,
        aux_loss=aux_loss,
        after_step=after_step,
        progress=progress,
        desc=desc,
        log_dir=log_dir,
        mode=mode,
    )
    assert mode.record is not None  # set when the run ends
    return result, mode.record
