"""Device choice and mixed precision: CUDA with bf16 autocast when present, else CPU in fp32."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from flexmoe.errors import FlexMoEError


def pick_device(name: str = "auto") -> torch.device:
    """Resolve ``auto`` to CUDA when available, else CPU; validate an explicit name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise FlexMoEError("--device", f"unknown device {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlexMoEError("--device", "CUDA was asked for but is not available")
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU runs in fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters live (CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


@contextlib.contextmanager
def on_device(model: torch.nn.Module, device: torch.device | None) -> Iterator[torch.device]:
    """Run a block with ``model`` on ``device`` (default: where it is) and put it back after,
    so that a caller's model stays where the caller put it; yields the device."""
    home = model_device(model)
    target = device or home
    if target != home:
        model.to(target)
    try:
        yield target
    finally:
        if target != home:
            model.to(home)
