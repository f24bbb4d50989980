"""The coordinator's server optimiser: how the owners' averaged change of a trunk phase is
applied to the trunk (FedOpt: Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The averaged change is a pseudo-gradient; the optimiser's state is kept with each trunk version
(``merge.slots.TrunkVersion``), so that a rebuild after an opt-out continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from flexmoe.errors import FlexMoEError

if TYPE_CHECKING:  # both heavy to import: the command line reads this module's defaults
    import torch

    from flexmoe.merge.slots import ServerOptimizerRecord


class ServerOptimizerName(StrEnum):
    FEDAVG = "fedavg"  # add the average (times lr)
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"


def _optimizer_name(value: object) -> ServerOptimizerName:
    """``value`` as a server optimiser's name, or a one-line error naming the known ones."""
    if value not in ServerOptimizerName._value2member_map_:
        known = ", ".join(n.value for n in ServerOptimizerName)
        raise FlexMoEError("--server-optimizer", f"must be one of {known}, got {value!r}")
    return ServerOptimizerName(str(value))


@dataclass(frozen=True)
class ServerOptimizer:
    """How the coordinator applies the averaged change ``d`` of a trunk phase to the trunk ``x``:

    - ``fedavg``: ``x + lr * d`` (lr 1: plain FedAvg);
    - ``fedadam``: ``m = b1 m + (1 - b1) d``, ``v = b2 v + (1 - b2) d^2``,
      ``x + lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + tau)``;
    - ``fedyogi``: ``m`` as Adam's, ``v = v - (1 - b2) d^2 sign(v - d^2)``,
      ``x + lr * m / (sqrt(v) + tau)``.

    These are Flower's ``FedAdam`` and ``FedYogi`` (``flwr.server.strategy``), element by
    element, with ``t`` the server step counted from 1 (Flower's FedAdam counts its bias
    correction from the round number plus one); ``m`` and ``v`` start at zero.
    """

    name: ServerOptimizerName = ServerOptimizerName.FEDAVG
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    decay_steps: int = 0  # > 0: lr follows a cosine to lr / 10 at this server step, then stays

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", _optimizer_name(self.name))
        if not self.lr > 0:
            raise FlexMoEError("--server-lr", f"must be positive, got {self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise FlexMoEError("--server-optimizer", "its betas must be in [0, 1)")
        if not self.tau > 0:
            raise FlexMoEError("--server-tau", f"must be positive, got {self.tau}")
        if self.decay_steps < 0:
            raise FlexMoEError("--server-decay", f"must not be negative, got {self.decay_steps}")

    def lr_at(self, t: int) -> float:
        """The learning rate of server step ``t`` (from 1)."""
        if not self.decay_steps:
            return self.lr
        progress = min(1.0, (t - 1) / max(1, self.decay_steps - 1))
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def continues(self, other: ServerOptimizer) -> bool:
        """Whether ``other``'s state carries over to this optimiser (the same kind and betas;
        its learning rate and schedule may change between runs)."""
        return (self.name, self.beta1, self.beta2, self.tau) == (
            other.name,
            other.beta1,
            other.beta2,
            other.tau,
        )

    @property
    def stateful(self) -> bool:
        return self.name != ServerOptimizerName.FEDAVG

    def record(self, step: int) -> ServerOptimizerRecord:
        from flexmoe.merge.slots import ServerOptimizerRecord

        return ServerOptimizerRecord(
            name=self.name.value,
            lr=self.lr,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=self.tau,
            decay_steps=self.decay_steps,
            step=step,
        )

    @classmethod
    def of(cls, record: ServerOptimizerRecord) -> ServerOptimizer:
        return cls(
            ServerOptimizerName(record.name), record.lr, record.beta1, record.beta2, record.tau
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, float | int | str]) -> ServerOptimizer:
        """The inverse of :meth:`to_dict` (missing fields take their defaults)."""
        name = _optimizer_name(data.get("name", ServerOptimizerName.FEDAVG.value))
        values = {k: float(v) for k, v in data.items() if k not in ("name", "decay_steps")}
        return cls(name, decay_steps=int(data.get("decay_steps", 0)), **values)

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "name": self.name.value,
            "lr": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
            "decay_steps": self.decay_steps,
        }

    def step(
        self,
        weights: dict[str, torch.Tensor],
        change: dict[str, torch.Tensor],
        state: dict[str, torch.Tensor],
        t: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Server step ``t`` (from 1): the new weights and the new state (``m.KEY``, ``v.KEY``;
        empty for fedavg), every tensor float32."""
        import torch

        lr = self.lr_at(t)
        if self.name == ServerOptimizerName.FEDAVG:
            return {k: weights[k] + lr * change[k] for k in weights}, {}
        new, moments = {}, {}
        scale = lr
        if self.name == ServerOptimizerName.FEDADAM:
            scale *= (1 - self.beta2**t) ** 0.5 / (1 - self.beta1**t)
        for key, x in weights.items():
            d = change[key]
            m = state.get(f"m.{key}", torch.zeros_like(d)) * self.beta1 + (1 - self.beta1) * d
            v = state.get(f"v.{key}", torch.zeros_like(d))
            if self.name == ServerOptimizerName.FEDADAM:
                v = self.beta2 * v + (1 - self.beta2) * d * d
            else:
                v = v - (1 - self.beta2) * d * d * torch.sign(v - d * d)
            new[key] = x + scale * m / (v.sqrt() + self.tau)
            moments[f"m.{key}"], moments[f"v.{key}"] = m, v
        return new, moments


# The rounds' default (docs/federated.md): FedAdam, lr 0.003, tau small enough that the step is
# Adam's on the owners' pooled gradient.
FEDERATED_SERVER = ServerOptimizer(ServerOptimizerName.FEDADAM, lr=3e-3, tau=1e-8)
