"""Owner-level differential privacy for federated rounds (``--dp-owner-epsilon``).

The unit protected is the owner: each owner clips the update it sends (its router change, or the
change of its slot) to an L2 norm of ``clip`` and adds Gaussian noise of standard deviation
``noise_multiplier * clip`` at home, before anything leaves; the noise is drawn from the
operating system's randomness, so that nobody else can subtract it. Every owner sends one
update per phase of every round it takes part in, each a Gaussian mechanism of sensitivity
``clip``; Opacus's RDP accountant composes them (sampling rate 1: every owner, every phase) into
the epsilon at ``delta`` recorded in the model for each owner.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flexmoe.errors import FlexMoEError

if TYPE_CHECKING:
    import torch

DELTA = 1e-5
# The default clipping norm of a router update: above a typical one, measured on the demo set at
# the default recipe (router changes 0.16-0.20 averaged over the owners), so that clipping
# rarely bites and the noise is what the privacy costs; a trunk update's, 1.0. Router and trunk
# phases take noise, slot phases do not (flower.RoundPlan says why).
CLIP = {"router": 0.5, "trunk": 1.0}


@dataclass(frozen=True)
class UpdatePrivacy:
    """The noise that gives every owner ``epsilon`` at ``delta`` over ``releases`` updates."""

    epsilon: float
    delta: float
    releases: int
    noise_multiplier: float
    clip: dict[str, float]

    @classmethod
    def for_budget(
        cls, epsilon: float, releases: int, *, delta: float = DELTA, clip: dict[str, float] | None
    ) -> UpdatePrivacy:
        from opacus.accountants.utils import get_noise_multiplier

        if not (epsilon > 0 and math.isfinite(epsilon)):
            raise FlexMoEError("--dp-owner-epsilon", f"must be a positive number, got {epsilon}")
        if not 0 < delta < 1:
            raise FlexMoEError("--dp-owner-delta", f"must be between 0 and 1, got {delta}")
        clip = {**CLIP, **(clip or {})}
        for kind, bound in clip.items():
            if not (bound > 0 and math.isfinite(bound)):
                raise FlexMoEError(f"--dp-clip {kind}", f"must be a positive number, got {bound}")
        with warnings.catch_warnings():  # "optimal order is the smallest alpha" at large epsilon
            warnings.simplefilter("ignore")
            sigma = get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=1.0,
                steps=releases,
                accountant="rdp",
            )
        return cls(epsilon, delta, releases, float(sigma), clip)

    def to_dict(self) -> dict[str, object]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "releases": self.releases,
            "noise_multiplier": self.noise_multiplier,
            "clip": dict(self.clip),
        }


def spent(noise_multipliers: list[float], delta: float) -> float:
    """The epsilon at ``delta`` of one owner's updates, one noise multiplier each (``inf`` if
    any went without noise)."""
    from opacus.accountants import RDPAccountant

    if not noise_multipliers:
        return 0.0
    if any(s <= 0 for s in noise_multipliers):
        return math.inf
    accountant = RDPAccountant()
    for sigma in sorted(set(noise_multipliers)):
        accountant.history.append((sigma, 1.0, noise_multipliers.count(sigma)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


def privatize(
    change: dict[str, torch.Tensor], clip: float, noise_multiplier: float
) -> tuple[dict[str, torch.Tensor], float]:
    """``change`` clipped to an L2 norm of ``clip`` over all its tensors, plus Gaussian noise of
    standard deviation ``noise_multiplier * clip`` on every element (float32); and the norm
    before clipping."""
    import torch

    norm = math.sqrt(sum(float(t.float().pow(2).sum()) for t in change.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    noised = {}
    for key, tensor in change.items():
        noise = torch.randn(tensor.shape, generator=generator) * (noise_multiplier * clip)
        noised[key] = tensor.float().cpu() * scale + noise
    return noised, norm
