"""Attribution: each expert's share of the routing mass, for the prompt and the generated tokens.

A forward hook on every MoE layer collects the routing weights after top-k (B, T, N). The first
forward of a generation covers the prompt; each later one adds one generated token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from flexmoe.model.checkpoint import moe_layers


@dataclass
class RoutingRecord:
    """Routing weights per forward call, averaged over layers: each (B, T, N)."""

    calls: list[torch.Tensor] = field(default_factory=list)

    def shares(self, calls: slice) -> torch.Tensor:
        """``(B, N)``: mean routing mass per expert over the tokens of the chosen calls."""
        chosen = self.calls[calls]
        if not chosen:
            return torch.zeros(0)
        weights = torch.cat(chosen, dim=1)  # (B, T, N)
        return weights.mean(dim=1) / weights.mean(dim=1).sum(-1, keepdim=True).clamp(min=1e-12)

    def per_token(self) -> torch.Tensor:
        """``(B, T_all, N)``: every token's routing mass, prompt then generated."""
        return torch.cat(self.calls, dim=1)


@contextmanager
def record_routing(model: torch.nn.Module) -> Iterator[RoutingRecord]:
    """Collect routing weights of every forward inside the block."""
    layers = moe_layers(model)
    record = RoutingRecord()
    pending: list[torch.Tensor] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        pending.append(module.last_routing)
        if len(pending) == len(layers):  # the last layer of one forward call
            record.calls.append(torch.stack(pending).mean(0).float().cpu())  # (B, T, N)
            pending.clear()

    handles = []
    for layer in layers:
        layer.capture = True
        handles.append(layer.register_forward_hook(hook))
    try:
        yield record
    finally:
        for layer, handle in zip(layers, handles, strict=True):
            handle.remove()
            layer.capture = False
            layer.last_routing = None
