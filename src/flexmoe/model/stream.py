"""Tensors moved one at a time: lazy sources, streamed hashes, streamed safetensors writes.

Large checkpoints never have to sit whole in host memory: a :class:`TensorSource` loads its tensor
only when asked, :func:`write_safetensors` writes the file header from shapes alone and then each
tensor's bytes as they come, and :func:`fill_model` places each tensor straight onto its device.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from flexmoe.errors import FlexMoEError

# safetensors' dtype codes, for the dtypes a model is stored in (and the int64 of token data).
_CODES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "I64": torch.int64,
}
_NAMES = {dtype: code for code, dtype in _CODES.items()}


@dataclass(frozen=True)
class TensorSource:
    """One tensor to be written: its name, shape and dtype, and a loader called only when the
    tensor is needed (the loader returns it in ``dtype``)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def cast(self, dtype: torch.dtype) -> TensorSource:
        """The same tensor, loaded in ``dtype`` (no change when it already is)."""
        if dtype == self.dtype:
            return self
        load = self.load
        return TensorSource(self.name, self.shape, dtype, lambda: load().to(dtype))

    def renamed(self, name: str) -> TensorSource:
        return TensorSource(name, self.shape, self.dtype, self.load)


def tensor_reader(path: Path, key: str) -> Callable[[], torch.Tensor]:
    """A loader of one tensor of a safetensors file (the file is opened at each call)."""

    def load() -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)

    return load


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor of a safetensors file, from its header alone."""
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in sorted(f.keys()):
                sl = f.get_slice(key)
                code = sl.get_dtype()
                if code not in _CODES:
                    raise FlexMoEError(path, f"tensor {key} has unsupported dtype {code}")
                out[key] = (tuple(sl.get_shape()), _CODES[code])
    except (SafetensorError, OSError, ValueError) as e:
        raise FlexMoEError(path, f"not a readable safetensors file ({e})") from e
    return out


def file_sources(path: Path) -> list[TensorSource]:
    """A lazy source for each tensor of one safetensors file, in name order."""
    return [
        TensorSource(key, shape, dtype, tensor_reader(path, key))
        for key, (shape, dtype) in read_header(path).items()
    ]


def hash_tensor(h: Any, name: str, tensor: torch.Tensor) -> None:
    """Add one tensor to a running sha256: its name, dtype, shape and raw bytes."""
    t = tensor.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy())


def sha256_sources(sources: Iterable[TensorSource]) -> str:
    """The sha256 :func:`flexmoe.model.checkpoint.tensors_sha256` gives the same tensors, loading
    them one at a time in name order."""
    h = hashlib.sha256()
    for source in sorted(sources, key=lambda s: s.name):
        hash_tensor(h, source.name, source.load())
    return h.hexdigest()


def write_safetensors(
    path: Path, sources: list[TensorSource], *, on_tensor: Callable[[TensorSource], None] | None
) -> None:
    """Write ``sources`` as one safetensors file, holding one tensor in memory at a time.

    The header is made from shapes and dtypes, then each tensor's bytes follow in order;
    ``on_tensor`` is called after each tensor (progress). The result reads back with safetensors.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for source in sources:
        if source.dtype not in _NAMES:
            raise FlexMoEError(path, f"tensor {source.name}: dtype {source.dtype} not writable")
        header[source.name] = {
            "dtype": _NAMES[source.dtype],
            "shape": list(source.shape),
            "data_offsets": [offset, offset + source.nbytes],
        }
        offset += source.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for source in sources:
            tensor = source.load().detach().to(source.dtype).cpu().contiguous()
            if tuple(tensor.shape) != source.shape:
                raise FlexMoEError(
                    path,
                    f"tensor {source.name} has shape {tuple(tensor.shape)}, "
                    f"expected {source.shape}",
                )
            if tensor.numel():
                f.write(tensor.view(torch.uint8).numpy().data)
            del tensor
            if on_tensor is not None:
                on_tensor(source)


def shard_sources(sources: list[TensorSource], max_bytes: int) -> list[list[TensorSource]]:
    """Consecutive groups of ``sources`` of at most ``max_bytes`` each (one tensor may exceed)."""
    shards: list[list[TensorSource]] = [[]]
    size = 0
    for source in sources:
        if shards[-1] and size + source.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(source)
        size += source.nbytes
    return shards


def check_keys(where: Path, expected: set[str], found: set[str]) -> None:
    """Every expected tensor name is found and nothing else (the first three of each named)."""
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FlexMoEError(where, f"missing tensors: {', '.join(missing[:3])}{more}")
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise FlexMoEError(where, f"unexpected tensors: {', '.join(unexpected[:3])}{more}")


def fill_model(
    model: torch.nn.Module,
    sources: list[TensorSource],
    *,
    device: torch.device,
    dtype: torch.dtype,
    where: Path,
) -> None:
    """Give a model built on the meta device its tensors, one at a time, each loaded, cast to
    ``dtype`` and moved to ``device`` (host memory holds one tensor at a time). Every name and
    shape is checked first; every parameter and buffer must be given."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    given = {s.name: s for s in sources}
    check_keys(where, set(expected), set(given))
    for name, source in given.items():
        if source.shape != expected[name]:
            raise FlexMoEError(
                where, f"tensor {name} has shape {source.shape}, expected {expected[name]}"
            )
        if not source.dtype.is_floating_point:
            raise FlexMoEError(where, f"tensor {name} has dtype {source.dtype}, expected a float")
    for name, source in given.items():
        tensor = source.load().to(device=device, dtype=dtype)
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = module._parameters.get(leaf)
        if old is not None:
            module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
        else:
            module._buffers[leaf] = tensor
