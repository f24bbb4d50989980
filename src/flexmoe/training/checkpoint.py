"""Training checkpoints in safetensors + JSON: trainable tensors, optimizer state, progress."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_directory

PARAMS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where training stands: the next step to run and what has been seen."""

    step: int
    tokens: int
    config: dict[str, Any]
    data_tokens: int
    history: list[dict[str, float]]


def save_checkpoint(
    directory: Path,
    *,
    params: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    write: bool = True,
) -> None:
    """Replace ``directory`` with a complete checkpoint (written aside, then renamed).

    Sharded (FSDP) tensors are gathered whole first, so every process must call this; only the
    one with ``write`` writes.
    """
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, slots in opt["state"].items():
        for name, value in slots.items():
            tensors[f"state.{index}.{name}"] = _whole(torch.as_tensor(value))
    whole = {k: _whole(v) for k, v in params.items()}
    if not write:
        return
    with atomic_directory(directory, overwrite=True) as tmp:
        save_file(whole, str(tmp / PARAMS_FILE))
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        payload = {
            "step": state.step,
            "tokens": state.tokens,
            "config": state.config,
            "data_tokens": state.data_tokens,
            "history": state.history,
            "param_groups": opt["param_groups"],
        }
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2))


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor whole on the CPU; a sharded one is gathered from every process."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous()


def _like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``whole`` placed as ``param`` is: on its device, and sharded the same way if it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements)
    return whole.to(param.device)


def load_checkpoint(
    directory: Path, *, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer
) -> TrainerState:
    """Restore trainable tensors and optimizer state in place; return the trainer state."""
    try:
        payload = json.loads((directory / STATE_FILE).read_text())
        saved = load_file(directory / PARAMS_FILE)
        opt_tensors = load_file(directory / OPTIMIZER_FILE)
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise FlexMoEError(directory, f"not a readable checkpoint ({e})") from e
    if set(saved) != set(params):
        raise FlexMoEError(directory / PARAMS_FILE, "checkpoint tensors do not match the model")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(_like(saved[name], param))
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in opt_tensors.items():
        _, index, name = key.split(".", 2)
        param = ordered[int(index)]
        shaped = value.shape == param.shape and value.dim() > 0  # a moment, not the step count
        opt_state.setdefault(int(index), {})[name] = _like(value, param) if shaped else value
    optimizer.load_state_dict({"state": opt_state, "param_groups": payload["param_groups"]})
    return TrainerState(
        step=payload["step"],
        tokens=payload["tokens"],
        config=payload["config"],
        data_tokens=payload["data_tokens"],
        history=payload["history"],
    )
