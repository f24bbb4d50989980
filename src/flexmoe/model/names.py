"""Declarative weight names: transformers' on-disk keys and flexmoe's runtime keys.

On disk (transformers FlexOlmo format) the router is one ``(N, H)`` tensor per layer; at run time
it is one parameter per row, so that the public row can stay frozen by construction. Every other
name is the same in both places.
"""

from __future__ import annotations

import torch

ROUTER_ON_DISK = "model.layers.{layer}.mlp.gate.weight"
ROUTER_ROW = "model.layers.{layer}.mlp.router.rows.{expert}"
ROUTER_BIAS = "model.layers.{layer}.mlp.router.biases.{index}"  # flexmoe extension, not on disk
EXPERT = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
DENSE_MLP = "model.layers.{layer}.mlp.{proj}.weight"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def runtime_from_disk(
    state: dict[str, torch.Tensor], *, num_layers: int
) -> dict[str, torch.Tensor]:
    """Split each layer's stacked router into one tensor per row."""
    out = dict(state)
    for layer in range(num_layers):
        key = ROUTER_ON_DISK.format(layer=layer)
        if key in out:
            for expert, row in enumerate(out.pop(key).unbind(0)):
                out[ROUTER_ROW.format(layer=layer, expert=expert)] = row
    return out


def disk_from_runtime(
    state: dict[str, torch.Tensor], *, num_layers: int, num_experts: int
) -> dict[str, torch.Tensor]:
    """Stack router rows into transformers' ``(N, H)`` gate; drop flexmoe-only tensors."""
    out = dict(state)
    for layer in range(num_layers):
        rows = [out.pop(ROUTER_ROW.format(layer=layer, expert=e)) for e in range(num_experts)]
        out[ROUTER_ON_DISK.format(layer=layer)] = torch.stack(rows)
        for index in range(num_experts - 1):
            out.pop(ROUTER_BIAS.format(layer=layer, index=index), None)
    return out


def flexmoe_only_keys(*, num_layers: int, num_experts: int) -> set[str]:
    """Runtime keys that transformers' format does not carry (the negative biases)."""
    return {
        ROUTER_BIAS.format(layer=layer, index=index)
        for layer in range(num_layers)
        for index in range(num_experts - 1)
    }


def upcycled_from_dense(
    state: dict[str, torch.Tensor], *, num_layers: int, num_experts: int
) -> dict[str, torch.Tensor]:
    """Runtime tensors of an MoE whose experts all start as the dense MLP.

    Expert 0 shares the dense tensors (no copy); experts 1.. get their own copies.
    """
    out = dict(state)
    for layer in range(num_layers):
        for proj in PROJECTIONS:
            dense = out.pop(DENSE_MLP.format(layer=layer, proj=proj))
            for expert in range(num_experts):
                key = EXPERT.format(layer=layer, expert=expert, proj=proj)
                out[key] = dense if expert == 0 else dense.detach().clone()
    return out
