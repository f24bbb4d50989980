"""Where tensors live and in which dtype: the one place that decides.

Devices: CUDA with bf16 autocast when present, else the CPU in fp32. Dtypes: every file a model
is written to (anchor, package, merged model) holds its tensors in the anchor's *stored* dtype
(``--dtype``; a bf16 source stays bf16). In memory, weights are held in the *compute* dtype: the
stored one on CUDA (bf16 weights under bf16 autocast), float32 on the CPU, whose bf16 matmuls are
slow. Trained tensors are always float32 (the optimiser's master copy) and are rounded to the
stored dtype when written. bf16 -> float32 -> bf16 is exact, so fingerprints stay exact.
"""

from __future__ import annotations

import contextlib
import os
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


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(name: str, *, field: str = "--dtype") -> torch.dtype:
    """``float32``, ``bfloat16`` or ``float16`` (``fp32``, ``bf16``, ``fp16`` too)."""
    short = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    key = short.get(name, name)
    if key not in DTYPES:
        raise FlexMoEError(field, f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The name :func:`parse_dtype` reads back (``torch.bfloat16`` -> ``bfloat16``)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise FlexMoEError("dtype", f"{dtype} is not a model dtype ({', '.join(DTYPES)})")


def compute_dtype(device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The dtype weights are held in for compute: ``stored`` on CUDA, float32 on the CPU."""
    return stored if device.type == "cuda" else torch.float32


def serving_threads() -> int:
    """CPU threads for a server's generation: the usable cores less one, which stays with the
    event loop and the tokenizer (on a busy 2-core machine every core for the matmuls starved
    both)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1)


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
