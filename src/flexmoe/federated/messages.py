"""What travels in a round, as Flower carries it: arrays and a flat config of scalars.

The coordinator sends the model's state (:func:`encode_task`, or the dense model's for the
``fedavg`` baseline) and the task; an owner replies with its update, or with its slot package as
byte arrays (:func:`package_arrays`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from flexmoe.errors import FlexMoEError
from flexmoe.expert.manifest import MANIFEST_FILE, TENSORS_FILE
from flexmoe.expert.signing import SIGNATURE_FILE
from flexmoe.federated.owner import ModelState, RoundTask
from flexmoe.federated.trunk import ROWS
from flexmoe.merge.layout import MergedModel
from flexmoe.training.config import TrainConfig

PACKAGE_FILES = (MANIFEST_FILE, TENSORS_FILE, SIGNATURE_FILE)
KINDS = ("slot", "router", "trunk", "dense")
Arrays = list[np.ndarray]
Updates = dict[str, tuple[Arrays, int]]  # owner -> (its arrays, the tokens it trained on)
Config = dict[str, bool | bytes | float | int | str]  # Flower's config values
MODEL_KEY = "model"  # the fingerprint of the merged model the coordinator's state applies to


def check_model(config: Config, merged: MergedModel) -> None:
    """The owner's copy of the merged model is the one the coordinator's state applies to."""
    expected = config.get(MODEL_KEY)
    if expected is not None and expected != merged.fingerprint():
        raise FlexMoEError(
            merged.path,
            "this copy of the merged model differs from the coordinator's "
            "(fetch the model it serves)",
        )


def task_config(task: RoundTask) -> Config:
    """The task as Flower config."""
    return {
        "kind": task.kind,
        "round": task.round,
        "cfg": json.dumps(task.cfg.to_dict()),
        "excluded": json.dumps(sorted(task.excluded)),
        "slot_row": task.slot_row,
        "router_sgd": task.router_sgd,
        "trunk_sgd": task.trunk_sgd,
        "dp_clip": task.dp_clip,
        "dp_noise": task.dp_noise,
        "lora_rank": task.lora_rank,
        "trunk_embeddings": task.trunk_embeddings,
    }


def read_task(config: Config) -> RoundTask:
    """The inverse of :func:`task_config`."""
    kind = str(config["kind"])
    if kind not in KINDS:
        raise FlexMoEError("round", f"unknown kind of work {kind!r}")
    return RoundTask(
        kind=kind,  # type: ignore[arg-type]
        round=int(config["round"]),
        cfg=TrainConfig.from_dict(json.loads(str(config["cfg"]))),
        excluded=frozenset(json.loads(str(config["excluded"]))),
        slot_row=bool(config.get("slot_row", True)),
        router_sgd=bool(config.get("router_sgd", True)),
        trunk_sgd=bool(config.get("trunk_sgd", False)),
        dp_clip=float(config.get("dp_clip", 0.0)),
        dp_noise=float(config.get("dp_noise", 0.0)),
        lora_rank=int(config.get("lora_rank", 0)),
        trunk_embeddings=str(config.get("trunk_embeddings", "none")),
    )


def encode_task(state: ModelState, task: RoundTask) -> tuple[list[np.ndarray], Config]:
    """The state as arrays (the rows, each refined slot's tensors in key order, then the trunk's
    in key order) and the task as config."""
    arrays = [state.rows.numpy()]
    layout = {}
    for name in sorted(state.slots):
        keys = sorted(state.slots[name])
        layout[name] = keys
        arrays += [state.slots[name][k].float().numpy() for k in keys]
    trunk = sorted(state.trunk)
    arrays += [state.trunk[k].float().numpy() for k in trunk]
    config = {**task_config(task), "slots": json.dumps(layout), "trunk": json.dumps(trunk)}
    return arrays, config


def decode_task(
    arrays: list[np.ndarray], config: Config, dtype: torch.dtype
) -> tuple[ModelState, RoundTask]:
    """The inverse of :func:`encode_task`; slot tensors back in ``dtype`` (the model's), the
    trunk in float32."""
    rows = _float32(arrays[0])
    layout: dict[str, list[str]] = json.loads(str(config["slots"]))
    trunk_keys: list[str] = json.loads(str(config.get("trunk", "[]")))
    expected = 1 + sum(len(keys) for keys in layout.values()) + len(trunk_keys)
    if len(arrays) != expected:
        raise FlexMoEError("round", f"a task of {len(arrays)} arrays, not {expected}")
    slots, at = {}, 1
    for name, keys in layout.items():
        slots[name] = {
            k: torch.from_numpy(np.array(arrays[at + i])).to(dtype) for i, k in enumerate(keys)
        }
        at += len(keys)
    trunk = {k: _float32(arrays[at + i]) for i, k in enumerate(trunk_keys)}
    return ModelState(rows=rows, slots=slots, trunk=trunk), read_task(config)


def _float32(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))


def encode_trunk_update(change: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """An owner's trunk update as arrays: the rows' change, then every trunk key's in key
    order (the coordinator knows the keys)."""
    return [change[ROWS].numpy()] + [change[k].numpy() for k in sorted(change) if k != ROWS]


def decode_trunk_update(arrays: list[np.ndarray], keys: list[str]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`encode_trunk_update` for the trunk of ``keys`` (sorted)."""
    if len(arrays) != 1 + len(keys):
        raise FlexMoEError("trunk round", f"an update of {len(arrays)} arrays, not {1 + len(keys)}")
    return {ROWS: _float32(arrays[0])} | {
        k: _float32(a) for k, a in zip(keys, arrays[1:], strict=True)
    }


def package_arrays(directory: Path) -> list[np.ndarray]:
    """A package's files as byte arrays, in :data:`PACKAGE_FILES` order (empty if absent)."""
    out = []
    for name in PACKAGE_FILES:
        path = directory / name
        data = path.read_bytes() if path.is_file() else b""
        out.append(np.frombuffer(data, dtype=np.uint8))
    return out


def write_package_arrays(arrays: list[np.ndarray], directory: Path) -> Path:
    """The files of :func:`package_arrays` written back into ``directory``."""
    if len(arrays) != len(PACKAGE_FILES):
        raise FlexMoEError("slot round", f"a slot reply of {len(arrays)} arrays, not a package")
    directory.mkdir(parents=True)
    for name, data in zip(PACKAGE_FILES, arrays, strict=True):
        if data.size:
            (directory / name).write_bytes(np.asarray(data, dtype=np.uint8).tobytes())
    return directory


def encode_dense(
    state: dict[str, torch.Tensor], task: RoundTask
) -> tuple[list[np.ndarray], Config]:
    """A dense model's state as arrays, its names in sorted order."""
    keys = sorted(state)
    return [state[k].numpy() for k in keys], {**task_config(task), "keys": json.dumps(keys)}


def decode_dense(arrays: list[np.ndarray], config: Config) -> dict[str, torch.Tensor]:
    keys: list[str] = json.loads(str(config["keys"]))
    if len(keys) != len(arrays):
        raise FlexMoEError("round", f"{len(arrays)} arrays for {len(keys)} tensors")
    return {
        k: torch.from_numpy(np.array(a, dtype=np.float32))
        for k, a in zip(keys, arrays, strict=True)
    }
